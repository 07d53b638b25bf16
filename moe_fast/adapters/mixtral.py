"""Mixtral: E in config.num_local_experts, top-k weights always renormalized."""

from __future__ import annotations

from moe_fast.adapters.base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    num_experts_key = "num_local_experts"
    block_attr = "mlp"
    router_scores_float32 = True
    hub_block_attr = "block_sparse_moe"  # checkpoints: block_sparse_moe.experts.N.w1/w2/w3
    hub_expert_proj = ("w1", "w3", "w2")  # gate, up, down

    @property
    def renormalize(self) -> bool:
        return True
