"""GLM-4.5 / 4.6: the DeepSeek-V3 router and block under other names (``GroupedSigmoidAdapter``);
its config usually has one group (``n_group = topk_group = 1``)."""

from __future__ import annotations

from moe_fast.adapters.grouped_sigmoid import GroupedSigmoidAdapter


class Glm4MoeAdapter(GroupedSigmoidAdapter):
    family = "glm4_moe"
    model_types = ("glm4_moe",)
