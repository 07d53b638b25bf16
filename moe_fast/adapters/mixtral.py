"""Mixtral: E in config.num_local_experts, top-k weights always renormalized."""

from __future__ import annotations

from moe_fast.adapters.base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    num_experts_key = "num_local_experts"
    block_attr = "mlp"

    @property
    def renormalize(self) -> bool:
        return True
