"""What DeepSeek-V3 and GLM-4.5 share: a sigmoid router with a per-layer score-correction bias and
expert groups, dense first layers, and shared experts beside the routed ones (docs/ROUTING.md).

Why one base for both: transformers' ``Glm4MoeTopkRouter`` and ``DeepseekV3TopkRouter`` are the
same code; the families differ only in their names, so each adapter file just names itself.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_fast.adapters.base import MoEAdapter
from moe_fast.kernels.routing_spec import RoutingSpec, grouped_sigmoid_routing


class GroupedSigmoidAdapter(MoEAdapter):
    num_experts_key = "n_routed_experts"
    block_attr = "mlp"
    router_attr = "gate"
    router_scores_float32 = True  # the stock router scores in float32 whatever the model's dtype
    selection_bias_attr = "e_score_correction_bias"
    hub_block_attr = "mlp"  # checkpoints: mlp.experts.N.{gate,up,down}_proj, mlp.gate.weight
    hub_expert_proj = ("gate_proj", "up_proj", "down_proj")
    router_expert_tensors = ("weight", "e_score_correction_bias")

    def routing(self, block: nn.Module | None = None) -> RoutingSpec:
        """The config's spec, with the layer's ``e_score_correction_bias`` when a block is given."""
        spec = grouped_sigmoid_routing(self.config)
        if block is None:
            return spec
        return spec.with_selection_bias(getattr(getattr(block, self.router_attr), self.selection_bias_attr))

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """None for the first ``first_k_dense_replace`` layers (a plain MLP there)."""
        block = getattr(layer, self.block_attr, None)
        if block is None or not hasattr(block, "shared_experts"):
            return None
        return super().moe_block(layer)

    def compute_router_logits(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """As the stock router: float32 logits whatever the model's dtype."""
        return nn.functional.linear(hidden.float(), router.weight.float())

    def extra_output(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output, added unweighted to the routed experts' (no gate)."""
        return block.shared_experts(hidden)

    def check_keep(self, keep: list[int]) -> None:
        """A pruned grouped router keeps ``n_group`` equal groups: the same count in each, at least
        two (a group scores its two best experts), and enough in ``topk_group`` groups for top-k."""
        super().check_keep(keep)
        spec = self.routing()
        if spec.n_group == 1:
            return
        size = self.num_experts // spec.n_group
        per_group = [sum(1 for e in keep if e // size == g) for g in range(spec.n_group)]
        if len(set(per_group)) != 1:
            raise ValueError(
                f"{self.family}: the router has {spec.n_group} expert groups of {size}; a pruned router must keep "
                f"the same number of experts in every group, got {per_group} per group for keep {keep}"
            )
        if per_group[0] < 2:
            raise ValueError(f"{self.family}: every expert group must keep at least 2 experts, got {per_group[0]}")
        if per_group[0] * spec.topk_group < spec.top_k:
            # Routing would fill slots from ineligible groups (docs/ROUTING.md); transformers picks
            # those among -inf ties in no documented order, and the grouped search assumes none.
            raise ValueError(
                f"{self.family}: topk_group = {spec.topk_group} groups of {per_group[0]} kept experts cannot hold "
                f"top-k = {spec.top_k} experts; the remaining slots would be filled from ineligible groups, which "
                "transformers' router picks in no reproducible order, so such a pruned router is not written"
            )
