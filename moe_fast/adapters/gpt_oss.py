"""gpt-oss: a router with a bias (``mlp.router``), softmax over the k chosen logits, and experts
with biases and a clamped SwiGLU on an interleaved, transposed gate_up tensor (docs/ROUTING.md).

Checkpoints in transformers' layout (``mlp.experts.gate_up_proj`` [E, H, 2I] and its bias, ...)
are exported by slicing dim 0; OpenAI's MXFP4 release (``*_blocks`` / ``*_scales``) is not handled.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from moe_fast.adapters.base import MoEAdapter
from moe_fast.routing_spec import RoutingSpec, topk_softmax_routing


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    num_experts_key = "num_local_experts"
    block_attr = "mlp"
    router_attr = "router"
    hub_block_attr = "mlp"
    router_expert_tensors = ("weight", "bias")
    fused_expert_tensors = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

    @property
    def renormalize(self) -> bool:
        return False  # the k softmax weights sum to 1 already

    def routing(self, block: nn.Module | None = None) -> RoutingSpec:
        return topk_softmax_routing(self.config)

    def compute_router_logits(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, router.weight, router.bias)

    def layer_call_kwargs(self, config, rotary: nn.Module, inputs_embeds: torch.Tensor) -> dict:
        """The model's masks of both attention types (``layer_types``: sliding and full layers
        alternate); ``layer_kwargs_for`` hands each layer its own."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kwargs = super().layer_call_kwargs(config, rotary, inputs_embeds)
        mask_kwargs = {"config": config, "inputs_embeds": inputs_embeds, "attention_mask": None,
                       "position_ids": kwargs["position_ids"]}
        masks = {}
        for kind, mask_fn in (("full_attention", create_causal_mask), ("sliding_attention", create_sliding_window_causal_mask)):
            cache_arg = "cache" if "cache" in inspect.signature(mask_fn).parameters else "past_key_values"
            masks[kind] = mask_fn(**mask_kwargs, **{cache_arg: None})
        return {**kwargs, "attention_mask": masks}

    def layer_kwargs_for(self, kwargs: dict, layer: nn.Module) -> dict:
        masks = kwargs["attention_mask"]
        if not isinstance(masks, dict):
            return kwargs
        return {**kwargs, "attention_mask": masks[self.config.layer_types[layer.self_attn.layer_idx]]}

    def block_return(self, output: torch.Tensor):
        """``GptOssMLP`` returns (output, router scores); the decoder layer drops the scores."""
        return output, None

    def expert_forward(self, experts: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        """As ``GptOssExperts.forward``: x @ W_gu + b_gu, its clamped SwiGLU, @ W_d + b_d."""
        gate_up = hidden @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
        return experts._apply_gate(gate_up) @ experts.down_proj[expert] + experts.down_proj_bias[expert]
