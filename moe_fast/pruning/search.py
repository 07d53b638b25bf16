"""Subset search over the exact pruning objective: exhaustive, greedy, beam.

Every search scores candidate dropped sets with ``ops.subset_loss`` on the layer's statistics
(no expert is re-run). Ties go to the lexicographically smallest dropped set, where losses that
agree to ``TIE_RTOL`` (relative) count as tied: the CPU and GPU kernels compute the losses with
the same formula but not the same rounding (about 1e-12 relative apart), and this way every device
and thread count picks the same set, unless a loss falls within that rounding of a tie border.

Rank bound for greedy and beam: the statistics are collected once per layer with
M = k + (E - R) ranked experts per token, enough for every intermediate set on the way from E
down to R experts. That costs M / k expert forwards per calibration token (instead of one pass
per elimination step with a growing M), which is the cheaper choice whenever the final drop
count is known in advance, as it is here.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from moe_fast.kernels import ops
from moe_fast.kernels.routing_spec import RoutingSpec

Dropped = tuple[int, ...]
Scorer = Callable[[Sequence[Dropped]], list[float]]

EXHAUSTIVE_LIMIT = 5000  # auto: enumerate when C(E, R) is at most this
TIE_RTOL = 1e-9  # losses within this relative distance of the best remaining one are tied


def choose_search(search: str, num_experts: int, num_keep: int, num_candidates: int | None = None) -> str:
    """Resolves ``auto``: exhaustive when the candidates (``num_candidates``, default C(E, R)) are at
    most EXHAUSTIVE_LIMIT, else beam."""
    if search not in ("auto", "exhaustive", "greedy", "beam"):
        raise ValueError(f"search must be auto, exhaustive, greedy or beam; got {search!r}")
    if search == "auto":
        count = math.comb(num_experts, num_keep) if num_candidates is None else num_candidates
        return "exhaustive" if count <= EXHAUSTIVE_LIMIT else "beam"
    return search


def objective_values(err: torch.Tensor, objective: str) -> torch.Tensor:
    """[C, G] squared errors per calibration batch -> [C] (paper: sum_g sqrt(err_g); mse: sum_g err_g)."""
    return err.clamp_min(0.0).sqrt().sum(1) if objective == "paper" else err.sum(1)


def keep_masks(cands: Sequence[Dropped], num_experts: int) -> torch.Tensor:
    """[C, E] bool keep-sets of the dropped sets (built on the host)."""
    keep = torch.ones(len(cands), num_experts, dtype=torch.bool)
    if cands and cands[0] and all(len(d) == len(cands[0]) for d in cands):  # one scatter
        return keep.scatter_(1, torch.tensor(cands, dtype=torch.int64), False)
    for row, dropped in enumerate(cands):
        keep[row, list(dropped)] = False
    return keep


GroupErrors = Callable[[Sequence[Dropped], torch.Tensor], torch.Tensor]  # (sets, keep [C, E]) -> [C, G] float64


def chunked_scorer(
    errors: GroupErrors, num_experts: int, objective: str, candidate_chunk: int = 512, progress: bool = False,
    desc: str = "candidates", reduce: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None,
) -> Scorer:
    """A Scorer from a function giving the [C, G] squared errors of a chunk of sets: chunks of
    ``candidate_chunk`` sets, a progress bar, and (data-parallel) ``reduce``, which gets the function
    computing this rank's errors and returns their sum over ranks (the square roots come after)."""
    if objective not in ("paper", "mse"):
        raise ValueError(f"objective must be paper or mse; got {objective!r}")

    def score(cands: Sequence[Dropped]) -> list[float]:
        values: list[float] = []
        bar = tqdm(total=len(cands), desc=desc, leave=False, disable=not progress)
        for lo in range(0, len(cands), candidate_chunk):
            part = cands[lo : lo + candidate_chunk]
            keep = keep_masks(part, num_experts)

            def compute(part=part, keep=keep) -> torch.Tensor:
                return errors(part, keep)

            err = (compute() if reduce is None else reduce(compute)).cpu()
            values.extend(float(v) for v in objective_values(err, objective))
            bar.update(len(part))
        bar.close()
        return values

    return score


def make_scorer(
    stats: dict[str, torch.Tensor | None],
    num_experts: int,
    top_k: int,
    renormalize: bool,
    objective: str,
    num_groups: int,
    candidate_chunk: int = 512,
    progress: bool = False,
    desc: str = "candidates",
    reduce: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None,
    routing: RoutingSpec | None = None,
) -> Scorer:
    """A function: dropped sets -> objective values (paper: sum_g sqrt(err_g); mse: sum_g err_g).

    ``routing`` (the layer's spec, the one its ``ids`` were ranked by): a router other than plain
    softmax is scored with ``ops.subset_loss_spec``; None or plain softmax with ``ops.subset_loss``
    over ``top_k`` and ``renormalize`` as always. ``reduce``: see ``chunked_scorer``.
    """
    # Candidate masks are built on the host and the groups never change during a search: both stay
    # on the CPU, so that a GPU subset_loss call does not synchronize with the host.
    group = stats["group"].cpu()

    def errors(part: Sequence[Dropped], keep_mask: torch.Tensor) -> torch.Tensor:
        if routing is not None and not routing.is_plain_softmax:
            return ops.subset_loss_spec(
                stats["gram"], stats["ids"], stats["logits"], keep_mask, group, num_groups, routing,
                target_weights=stats["target_weights"], cross=stats["cross"], target_sq=stats["target_sq"],
            )
        return ops.subset_loss(
            stats["gram"], stats["ids"], stats["logits"], keep_mask, group, num_groups,
            top_k, renormalize, target_weights=stats["target_weights"], cross=stats["cross"],
            target_sq=stats["target_sq"],
        )

    return chunked_scorer(errors, num_experts, objective, candidate_chunk, progress, desc, reduce)


def best_sets(cands: Sequence[Dropped], losses: Sequence[float], width: int = 1) -> list[Dropped]:
    """The ``width`` best sets, one at a time: among the remaining sets whose loss is within
    TIE_RTOL (relative) of the lowest remaining loss, the lexicographically smallest."""
    remaining = sorted(range(len(cands)), key=lambda i: (losses[i], cands[i]))
    chosen: list[int] = []
    while remaining and len(chosen) < width:
        low = losses[remaining[0]]
        bound = low + TIE_RTOL * abs(low)
        tied = [i for i in remaining if losses[i] <= bound]  # a prefix of `remaining`
        pick = min(tied or remaining[:1], key=lambda i: cands[i])
        chosen.append(pick)
        remaining.remove(pick)
    return [cands[i] for i in chosen]


def exhaustive(score: Scorer, num_experts: int, num_drop: int) -> tuple[Dropped, dict[Dropped, float]]:
    cands = list(itertools.combinations(range(num_experts), num_drop))
    losses = score(cands)
    return best_sets(cands, losses)[0], dict(zip(cands, losses))


def beam(score: Scorer, num_experts: int, num_drop: int, width: int = 1) -> tuple[Dropped, dict[Dropped, float]]:
    """Backward elimination keeping the ``width`` best sets per step (width 1: greedy)."""
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    frontier: list[Dropped] = [()]
    evaluated: dict[Dropped, float] = {}
    for _ in range(num_drop):
        cands = sorted({tuple(sorted(d + (e,))) for d in frontier for e in range(num_experts) if e not in d})
        losses = score(cands)
        evaluated.update(zip(cands, losses))
        frontier = best_sets(cands, losses, width)
    return frontier[0], evaluated


def run_search(
    method: str, score: Scorer, num_experts: int, num_drop: int, beam_width: int = 4
) -> tuple[Dropped, dict[Dropped, float]]:
    if num_drop == 0:
        return (), {}
    if method == "exhaustive":
        return exhaustive(score, num_experts, num_drop)
    if method == "greedy":
        return beam(score, num_experts, num_drop, 1)
    if method == "beam":
        return beam(score, num_experts, num_drop, beam_width)
    raise ValueError(f"unknown search {method!r}")
