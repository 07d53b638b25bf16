"""The demo's selections, each labelled with its method, r, calibration split and sample.

Layer-wise reconstruction (each search) and the statistic criteria come from one pass over a
calibration sample (``moe_fast.pruning.one_pass``: the pruning strategies, every r at once);
progressive pruning runs ``moe_fast.prune`` once per r (its inputs change with r); random draws.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.pruning import prune
from moe_fast.pruning.one_pass import one_pass_selections as one_pass
from moe_fast.pruning.strategies.criteria import select_random


@dataclass(frozen=True)
class Selection:
    """Experts kept per MoE layer by one method at one r on one calibration sample."""

    method: str  # layer-wise | progressive | greedy | beam | frequency | reap | ean | random
    num_keep: int  # experts kept per layer (r)
    calib: str | None  # prose | code | None (random)
    seed: int | None  # calibration sample (or random draw)
    kept: tuple[tuple[int, tuple[int, ...]], ...]  # ((layer, kept experts), ...)

    @property
    def kept_dict(self) -> dict[int, list[int]]:
        return {layer: list(experts) for layer, experts in self.kept}


def _freeze(kept: dict[int, list[int]]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    return tuple((int(layer), tuple(sorted(int(e) for e in experts))) for layer, experts in sorted(kept.items()))


def one_pass_selections(
    model: nn.Module, ids: torch.Tensor, num_keeps: tuple[int, ...], criteria: tuple[str, ...],
    searches: tuple[str, ...], calib: str, seed: int, batch_size: int = 8, beam_width: int = 4,
) -> list[Selection]:
    """Reconstruction (each search) and every statistic criterion at every r, from one pass."""
    kept = one_pass(model, ids, num_keeps, criteria, searches, batch_size, beam_width)
    out = []
    for num_keep in num_keeps:
        for search in searches:
            name = "layer-wise" if search == "exhaustive" else search
            out.append(Selection(name, num_keep, calib, seed, _freeze(kept[search, num_keep])))
        for criterion in criteria:
            out.append(Selection(criterion, num_keep, calib, seed, _freeze(kept[criterion, num_keep])))
    return out


def progressive_selection(model_path: str, ids: torch.Tensor, num_keep: int, calib: str, seed: int, batch_size: int = 8) -> Selection:
    """Progressive reconstruction-loss pruning (``moe_fast.prune``) in float32, no checkpoint."""
    result = prune(
        model_path, ids, num_keep, mode="progressive", batch_size=batch_size, dtype="float32", return_model=False,
        progress=False,
    )
    return Selection("progressive", num_keep, calib, seed, _freeze(result.report.kept))


def random_selection(layers: list[int], num_experts: int, num_keep: int, seed: int) -> Selection:
    rng = random.Random(seed)
    return Selection("random", num_keep, None, seed, _freeze({layer: select_random(num_experts, num_keep, rng) for layer in layers}))


def expert_flops_per_token(config, experts_per_token: float, num_moe_layers: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the routed experts for one token, summed over MoE layers."""
    hidden = int(config.hidden_size)
    inter = int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
    return 2.0 * 3 * hidden * inter * experts_per_token * num_moe_layers


def combinations_note(num_experts: int, num_keep: int) -> str:
    return f"C({num_experts},{num_keep}) = {math.comb(num_experts, num_keep)}"
