"""Qwen2-MoE: E in config.num_experts, optional renormalization (norm_topk_prob), and a shared
expert whose output is scaled by a sigmoid gate and added to the routed experts' output."""

from __future__ import annotations

import torch
from torch import nn

from moe_fast.adapters.base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    num_experts_key = "num_experts"
    block_attr = "mlp"

    def extra_output(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        gate = torch.sigmoid(block.shared_expert_gate(hidden))
        return gate * block.shared_expert(hidden)
