"""The subset search of a grouped router: only keep-sets with the same number of experts per group.

Why: a pruned grouped router must keep ``n_group`` equal groups (``GroupedSigmoidAdapter.check_keep``),
so the search ranges over those sets only.

* Exhaustive: every product over the groups of one ``C(group_size, drops_per_group)`` choice each.
* Greedy and beam: backward elimination where a step may drop an expert only from a group with
  the fewest drops so far, so every path stays balanced and ends with equal groups.

Scores come from ``grouped_outputs.GroupedOutputs`` (exact: each candidate routes every token,
or, in backward elimination, every token whose routing the added drop can change, the others
keeping their error under the parent set).
Ties go, as everywhere, to the lexicographically smallest dropped set (``search.best_sets``).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

from moe_fast.pruning.grouped_outputs import GroupedOutputs
from moe_fast.pruning.search import Dropped, Scorer, best_sets, chunked_scorer

Reduce = Callable[[Callable[[], torch.Tensor]], torch.Tensor]


def _group_size(num_experts: int, n_group: int, num_drop: int) -> int:
    if n_group < 1 or num_experts % n_group or num_drop % n_group:
        raise ValueError(
            f"grouped search: {num_experts} experts in {n_group} groups cannot drop {num_drop} experts "
            "equally from every group"
        )
    return num_experts // n_group


def balanced_count(num_experts: int, n_group: int, num_drop: int) -> int:
    """How many dropped sets take the same number from every group: C(size, drops per group) ** n_group."""
    size = _group_size(num_experts, n_group, num_drop)
    return math.comb(size, num_drop // n_group) ** n_group


def balanced_candidates(num_experts: int, n_group: int, num_drop: int) -> list[Dropped]:
    """All dropped sets with ``num_drop / n_group`` experts from every group, in lexicographic order."""
    size = _group_size(num_experts, n_group, num_drop)
    per = num_drop // n_group
    choices = [list(itertools.combinations(range(g * size, (g + 1) * size), per)) for g in range(n_group)]
    return [tuple(itertools.chain.from_iterable(p)) for p in itertools.product(*choices)]


def balanced_children(frontier: Sequence[Dropped], num_experts: int, n_group: int) -> list[Dropped]:
    """Each frontier set plus one expert from a group with the fewest drops so far (sorted, unique)."""
    size = num_experts // n_group
    children = set()
    for d in frontier:
        counts = [0] * n_group
        for e in d:
            counts[e // size] += 1
        low = min(counts)
        children.update(tuple(sorted(d + (e,))) for e in range(num_experts) if e not in d and counts[e // size] == low)
    return sorted(children)


def grouped_scorer(
    store: GroupedOutputs, objective: str, num_groups: int, reduce: Reduce | None = None,
    candidate_chunk: int = 256, progress: bool = False, desc: str = "candidates",
) -> Scorer:
    """Dropped sets -> objective values (paper: sum_g sqrt(err_g); mse: sum_g err_g). ``reduce``
    (data-parallel) sums the ranks' [C, G] squared errors before the square roots."""

    def errors(part: Sequence[Dropped], keep: torch.Tensor) -> torch.Tensor:
        err = torch.zeros(len(part), num_groups, dtype=torch.float64)
        parents = [store.parent_in_frontier(d) for d in part]
        full = [i for i, p in enumerate(parents) if p is None]
        if full:
            err[full] = store.group_errors(keep[full], num_groups)
        for i, p in enumerate(parents):
            if p is not None:  # one expert beyond a frontier set: only its affected tokens
                err[i] = store.child_errors(p[0], p[1], num_groups)
        return err

    return chunked_scorer(errors, store.num_experts, objective, candidate_chunk, progress, desc, reduce)


def run_grouped_search(
    method: str, score: Scorer, num_experts: int, n_group: int, num_drop: int, beam_width: int = 4,
    on_frontier: Callable[[list[Dropped]], None] | None = None,
) -> tuple[Dropped, dict[Dropped, float]]:
    """``search.run_search`` restricted to equal drops per group: (best dropped set, scores).

    ``on_frontier`` (greedy, beam) hears each frontier before its children are scored, so that the
    scorer can score a child against its parent (``GroupedOutputs.set_frontier``)."""
    if num_drop == 0:
        return (), {}
    _group_size(num_experts, n_group, num_drop)
    if method == "exhaustive":
        cands = balanced_candidates(num_experts, n_group, num_drop)
        losses = score(cands)
        return best_sets(cands, losses)[0], dict(zip(cands, losses))
    if method not in ("greedy", "beam"):
        raise ValueError(f"unknown search {method!r}")
    width = 1 if method == "greedy" else beam_width
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    frontier: list[Dropped] = [()]
    evaluated: dict[Dropped, float] = {}
    for _ in range(num_drop):
        if on_frontier is not None:
            on_frontier(frontier)
        cands = balanced_children(frontier, num_experts, n_group)
        losses = score(cands)
        evaluated.update(zip(cands, losses))
        frontier = best_sets(cands, losses, width)
    if on_frontier is not None:
        on_frontier([])  # frees the last states
    return frontier[0], evaluated
