"""Qwen3-MoE: like Qwen2-MoE without the shared expert; renormalizes when norm_topk_prob."""

from __future__ import annotations

from moe_fast.adapters.base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    num_experts_key = "num_experts"  # aliased to num_local_experts by the config's attribute_map
    block_attr = "mlp"
