"""The literature's criteria as they were first written: hooks on the experts of the whole model.

The specification the streaming criteria (``moe_fast.pruning.strategies.criteria``) must equal:
the full model runs in one piece on the calibration tokens, a forward pre-hook on every experts
module recomputes each routed expert's output, and the statistics are the means over routed
tokens. Random draws one ``random.Random(seed)`` in depth order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.adapters import get_adapter
from moe_fast.pruning.strategies.criteria import canonical_criterion, select_random, top_scores


@dataclass
class RoutingStats:
    """Per MoE layer statistics of the unpruned model on calibration tokens."""

    layers: list[int]
    counts: list[list[float]]  # [layer][expert]: top-k appearances
    reap: list[list[float]]  # [layer][expert]: mean over routed tokens of w * ||y_e||
    ean: list[list[float]]  # [layer][expert]: mean over routed tokens of ||y_e||
    tokens: int

    @property
    def saliency(self) -> list[list[float]]:
        return self.reap

    def table_for(self, criterion: str) -> list[list[float]]:
        """Per layer, the per-expert scores a criterion keeps the largest of."""
        return {"frequency": self.counts, "reap": self.reap, "ean": self.ean}[canonical_criterion(criterion)]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "counts": self.counts, "reap": self.reap, "ean": self.ean, "tokens": self.tokens}


def scores_from_sums(counts: torch.Tensor, weighted_norms: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reap, ean) per expert from sums over routed tokens; 0 for an expert no token reached."""
    routed = counts.clamp_min(1)
    zero = torch.zeros_like(weighted_norms)
    return torch.where(counts > 0, weighted_norms / routed, zero), torch.where(counts > 0, norms / routed, zero)


@torch.no_grad()
def routing_stats(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8, progress: bool = False) -> RoutingStats:
    """Counts and saliency of every expert of every MoE layer on ``calibration`` ids [N, L].

    Hooks the experts modules, so each layer sees the unpruned model's own inputs and routing.
    """
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    E = adapter.num_experts
    counts = {ref.layer: torch.zeros(E, dtype=torch.float64) for ref in blocks}
    sal_sum = {ref.layer: torch.zeros(E, dtype=torch.float64) for ref in blocks}
    norm_sum = {ref.layer: torch.zeros(E, dtype=torch.float64) for ref in blocks}

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            hidden, index, weights = (list(args) + [kwargs.get(k) for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs])[:3]
            for e in range(E):
                tok, slot = torch.where(index == e)
                if tok.numel() == 0:
                    continue
                y = adapter.expert_forward(module, e, hidden[tok])
                norm = y.float().norm(dim=-1).double()
                counts[layer][e] += tok.numel()
                sal_sum[layer][e] += (weights[tok, slot].double() * norm).sum()
                norm_sum[layer][e] += norm.sum()

        return hook

    handles = [ref.experts.register_forward_pre_hook(make_hook(ref.layer), with_kwargs=True) for ref in blocks]
    device = next(model.parameters()).device
    model.eval()
    try:
        for batch in calibration.split(batch_size):
            model(input_ids=batch.to(device))
    finally:
        for h in handles:
            h.remove()
    layers = [ref.layer for ref in blocks]
    scores = {l: scores_from_sums(counts[l], sal_sum[l], norm_sum[l]) for l in layers}
    return RoutingStats(
        layers, [counts[l].tolist() for l in layers], [scores[l][0].tolist() for l in layers],
        [scores[l][1].tolist() for l in layers], int(calibration.numel()),
    )


def select(criterion: str, num_experts: int, num_keep: int, layers: list[int], stats: RoutingStats | None = None, seed: int = 0) -> dict[int, list[int]]:
    """{layer: kept experts} for a criterion; ``stats`` is needed for all but random."""
    criterion = canonical_criterion(criterion)
    if criterion == "random":
        rng = random.Random(seed)
        return {layer: select_random(num_experts, num_keep, rng) for layer in layers}
    if stats is None:
        raise ValueError(f"criterion {criterion!r} needs routing statistics from calibration data")
    return {layer: top_scores(row, num_keep) for layer, row in zip(stats.layers, stats.table_for(criterion))}
