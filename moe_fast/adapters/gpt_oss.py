"""gpt-oss: a router with a bias (``mlp.router``), softmax over the k chosen logits, and experts
with biases and a clamped SwiGLU on an interleaved, transposed gate_up tensor (docs/ROUTING.md).

Checkpoints in transformers' layout (``mlp.experts.gate_up_proj`` [E, H, 2I] and its bias, ...)
are exported by slicing dim 0; OpenAI's MXFP4 release (``*_blocks`` / ``*_scales``) is not handled.
"""

from __future__ import annotations

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

    def expert_forward(self, experts: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        """As ``GptOssExperts.forward``: x @ W_gu + b_gu, its clamped SwiGLU, @ W_d + b_d."""
        gate_up = hidden @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
        return experts._apply_gate(gate_up) @ experts.down_proj[expert] + experts.down_proj_bias[expert]
