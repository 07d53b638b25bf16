"""OLMoE: every layer sparse, E in config.num_experts, renormalizes when norm_topk_prob."""

from __future__ import annotations

from moe_fast.adapters.base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    num_experts_key = "num_experts"  # num_local_experts is an alias in the config's attribute_map
    block_attr = "mlp"
