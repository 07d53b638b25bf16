"""gpt-oss: a router with a bias (``mlp.router``), softmax over the k chosen logits, and experts
with biases and a clamped SwiGLU on an interleaved, transposed gate_up tensor (docs/ROUTING.md).

Checkpoints in transformers' layout (``mlp.experts.gate_up_proj`` [E, H, 2I] and its bias, ...)
are exported by slicing dim 0. OpenAI's MXFP4 release (every gpt-oss checkpoint on the hub:
``mlp.experts.gate_up_proj_blocks`` [E, 2I, H/32, 16] and ``_scales`` [E, 2I, H/32], the same for
down_proj, uint8, see moe_fast/checkpoint/mxfp4.py) is read with the expert weights dequantized one layer at a
time (pruning from a path) and exported still MXFP4: blocks and scales keep the kept experts' rows of
dim 0, config.json its ``quantization_config``. A model loaded whole must be dequantized
(``Mxfp4Config(dequantize=True)``, what moe_fast's own loading passes); transformers' quantized
experts module (Triton kernels) is refused with that advice.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

from moe_fast.checkpoint import mxfp4
from moe_fast.adapters.base import MoEAdapter, MoEBlockRef
from moe_fast.kernels.routing_spec import RoutingSpec, topk_softmax_routing


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    num_experts_key = "num_local_experts"
    block_attr = "mlp"
    router_attr = "router"
    hub_block_attr = "mlp"
    router_expert_tensors = ("weight", "bias")
    fused_expert_tensors = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    # OpenAI's MXFP4 tensors: one entry per expert in dim 0, sliced like the fused ones on export.
    packed_expert_tensors = tuple(f"{p}{s}" for p in ("gate_up_proj", "down_proj") for s in mxfp4.PACKED_SUFFIXES)

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

    def moe_blocks(self, model: nn.Module) -> list[MoEBlockRef]:
        """As the base, refusing transformers' MXFP4 experts (packed uint8 weights run by Triton
        kernels): pruning and skipping need the experts' weights as numbers."""
        refs = super().moe_blocks(model)
        for ref in refs:
            weight = getattr(ref.experts, "gate_up_proj", None)
            if getattr(ref.experts, "gate_up_proj_precision_config", None) is not None or (
                isinstance(weight, torch.Tensor) and weight.dtype == torch.uint8
            ):
                raise ValueError(
                    f"moe_fast: layer {ref.layer} of this gpt-oss model holds MXFP4-quantized experts "
                    f"({type(ref.experts).__name__}); load the checkpoint dequantized: "
                    "from_pretrained(path, quantization_config=transformers.Mxfp4Config(dequantize=True)), "
                    "or give moe_fast the checkpoint's path"
                )
        return refs

    def layer_state_from_checkpoint(self, tensors) -> dict[str, torch.Tensor]:
        """As the base, with OpenAI's MXFP4 experts dequantized: ``<proj>_blocks`` and
        ``<proj>_scales`` become transformers' ``<proj>`` (bf16, exact), one projection at a time."""
        packed: dict[str, dict[str, str]] = {}
        for key in tensors.keys():
            hit = mxfp4.packed_key(key)
            if hit is not None:
                packed.setdefault(hit[0], {})[hit[1]] = key
        if not packed:
            return super().layer_state_from_checkpoint(tensors)
        rest = {key for key in tensors.keys() if mxfp4.packed_key(key) is None}
        state = super().layer_state_from_checkpoint(_Subset(tensors, rest))
        for name, pair in sorted(packed.items()):
            missing = [suffix for suffix in mxfp4.PACKED_SUFFIXES if suffix not in pair]
            if missing:
                raise ValueError(f"MXFP4 checkpoint: {name}{missing[0]} is missing beside {pair[next(iter(pair))]}")
            blocks, scales = tensors[pair["_blocks"]], tensors[pair["_scales"]]
            mxfp4.check_pair(name, blocks.shape, scales.shape, self.num_experts)
            if name.startswith(f"{self.hub_block_attr}."):
                name = f"{self.block_attr}." + name[len(self.hub_block_attr) + 1 :]
            state[name] = mxfp4.dequantize(blocks, scales, torch.bfloat16, name=name)
            del blocks, scales
        return state

    def prune_checkpoint_tensor(self, rel_key: str, tensor: torch.Tensor, keep: list[int]) -> tuple[str, torch.Tensor] | None:
        """As the base, with MXFP4 blocks and scales keeping the entries ``keep`` of dim 0 (the expert dim)."""
        if rel_key in {f"{block}.experts.{name}" for block in {self.hub_block_attr, self.block_attr}
                       for name in self.packed_expert_tensors}:
            if tensor.dim() < 3 or tensor.shape[0] != self.num_experts:
                raise ValueError(
                    f"MXFP4 checkpoint: {rel_key} has shape {list(tensor.shape)}, expected {self.num_experts} experts in dim 0"
                )
            return rel_key, tensor.index_select(0, torch.tensor(keep, dtype=torch.long)).contiguous()
        return super().prune_checkpoint_tensor(rel_key, tensor, keep)


class _Subset(Mapping):
    """Some keys of a (lazy) tensor mapping, read through it on access."""

    def __init__(self, tensors, keys) -> None:
        self.tensors, self.keys_ = tensors, [k for k in tensors.keys() if k in keys]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        return self.tensors[key]

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)
