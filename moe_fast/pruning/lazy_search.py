"""Searches over lazily computed expert outputs (``moe_fast.pruning.lazy_outputs``).

* Greedy and beam: a child D + e of a frontier set D reaches, per token, at most the (k + 1)-th
  expert outside D (dropping e moves the token's top-k one kept expert further only when e is
  in it). Each step extends the tokens to that depth for every frontier set, then scores all
  children exactly: the same losses, hence the same selections, as the rank-bounded search.
  With weights renormalized over the chosen experts a child changes a token's error only when it
  drops one of the token's k chosen experts, so each parent's children are scored from k + 1
  errors per token (``lazy_children``) instead of one per child; otherwise (softmax over all
  kept experts) every child is scored on every token.
* Exhaustive: branch and bound. A candidate's squared error over the tokens it covers (its top-k
  among the kept lies within their computed ranks) is a lower bound of its full error per batch
  (an uncovered token adds >= 0), and so are the objective's square roots and sums. Candidates
  whose bound is above the best exact score are discarded; the most promising unresolved one has
  its tokens extended; until no unresolved candidate can beat the best.

Ties between candidates go, as everywhere, to the lexicographically smallest dropped set.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from moe_fast.pruning.lazy_children import Rows, child_errors
from moe_fast.pruning.lazy_outputs import LazyOutputs, kth_kept_depth
from moe_fast.pruning.search import best_sets, keep_masks, objective_values

Dropped = tuple[int, ...]
Reduce = Callable[[Callable[[], torch.Tensor]], torch.Tensor]

# A bound discards a candidate only when it exceeds the best exact score by this relative margin:
# float32 Gram entries can make a token's error a rounding error below zero, so a partial sum is a
# lower bound only up to rounding. A candidate inside the margin is scored exactly instead.
BOUND_MARGIN = 1e-6


@dataclass
class LazyInfo:
    """What the lazy search did in one layer (for the report and the progress output)."""

    outputs_per_token: float = 0.0
    scored_exactly: int = 0
    discarded_by_bound: int = 0
    rounds: int = 0
    peak_bytes: int = 0
    floor_outputs_per_token: float = 0.0  # exhaustive: what the winner's own exact score needs (k + 1 ranks at least)
    depth_share: dict[int, float] = field(default_factory=dict)  # computed ranks -> share of tokens, at the end
    floor_share: dict[int, float] = field(default_factory=dict)  # exhaustive: ranks the winner needs -> share of tokens
    trace: list[dict] = field(default_factory=list)  # per round: candidates alive, depth statistics

    def summary(self) -> dict:
        """JSON-ready: rounds, per round the open candidates (exhaustive) and outputs per token, the
        share of tokens per computed depth and (exhaustive) per depth the winner alone needs."""
        out = {"rounds": self.rounds, "depth_share": self.depth_share,
               "outputs_per_token_by_round": [t["outputs_per_token"] for t in self.trace]}
        if self.floor_share:
            out.update(open_by_round=[t["open"] for t in self.trace], floor_outputs_per_token=round(self.floor_outputs_per_token, 4),
                       floor_share=self.floor_share)
        return out


def _shares(depth: torch.Tensor) -> dict[int, float]:
    """{ranks: share of tokens} of a [T] depth vector."""
    values, counts = torch.unique(depth.cpu(), return_counts=True)
    total = max(1, depth.numel())
    return {int(v): round(int(c) / total, 4) for v, c in zip(values, counts)}


def _depth_stats(store: LazyOutputs) -> dict:
    d = store.depth.float()
    return {"outputs_per_token": round(store.outputs_per_token, 4), "max_depth": int(store.depth.max()) if d.numel() else 0,
            "mean_depth": round(float(d.mean()), 4) if d.numel() else 0.0}


def _candidate_losses(
    store: LazyOutputs, cands: list[Dropped], objective: str, reduce: Reduce | None, candidate_chunk: int
) -> list[float]:
    """Objective of each candidate, every candidate scored on every token (any softmax router)."""
    losses: list[float] = []
    for lo in range(0, len(cands), candidate_chunk):
        keep_mask = keep_masks(cands[lo : lo + candidate_chunk], store.num_experts)

        def compute(keep_mask=keep_mask) -> torch.Tensor:
            return store.group_errors(keep_mask, store.num_groups_total)

        err = compute() if reduce is None else reduce(compute)
        losses.extend(float(v) for v in objective_values(err.cpu(), objective))
    return losses


def _children_losses(
    store: LazyOutputs, frontier: list[Dropped], cands: list[Dropped], objective: str, reduce: Reduce | None,
    rows: Rows,
) -> list[float]:
    """Objective of each candidate from its first parent in ``frontier`` (renormalized weights:
    k + 1 rows per token and parent, ``lazy_children.child_errors``)."""
    index = {c: i for i, c in enumerate(cands)}
    losses: list[float | None] = [None] * len(cands)
    for parent in frontier:
        mine = []  # (candidate index, e) of the candidates not scored from an earlier parent
        for e in range(store.num_experts):
            if e in parent:
                continue
            i = index[tuple(sorted(parent + (e,)))]
            if losses[i] is None:
                losses[i] = 0.0
                mine.append((i, e))
        if not mine:
            continue

        def compute(parent=parent) -> torch.Tensor:
            return child_errors(store, parent, store.num_groups_total, rows)

        err = compute() if reduce is None else reduce(compute)
        values = objective_values(err.cpu()[[e for _, e in mine]], objective).tolist()
        for (i, _), v in zip(mine, values):
            losses[i] = float(v)
    return losses


def lazy_beam(
    store: LazyOutputs, num_drop: int, objective: str, width: int = 1, reduce: Reduce | None = None,
    candidate_chunk: int = 512,
) -> tuple[Dropped, dict[Dropped, float], LazyInfo]:
    """Backward elimination keeping the ``width`` best sets per step (width 1: greedy)."""
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    E, k = store.num_experts, store.k
    info = LazyInfo()
    frontier: list[Dropped] = [()]
    evaluated: dict[Dropped, float] = {}
    rows: Rows = {}  # the frontier's row errors (lazy_children.child_errors)
    for _ in range(num_drop):
        cands = sorted({tuple(sorted(d + (e,))) for d in frontier for e in range(E) if e not in d})
        need = torch.zeros_like(store.depth)
        for d in frontier:
            dropped = torch.zeros(E, dtype=torch.bool, device=store.order.device)
            dropped[list(d)] = True
            need = torch.maximum(need, kth_kept_depth(store.order, dropped, k + 1))
        dead = torch.ones(E, dtype=torch.bool, device=store.order.device)  # dropped by every frontier set
        for d in frontier:
            drops = torch.zeros_like(dead)
            drops[list(d)] = True
            dead &= drops
        store.extend(need, dead)
        if store.renormalize:
            losses = _children_losses(store, frontier, cands, objective, reduce, rows)
        else:
            losses = _candidate_losses(store, cands, objective, reduce, candidate_chunk)
        evaluated.update(zip(cands, losses))
        rows = {d: rows[d] for d in frontier if d in rows}  # this step's parents' rows: the next step's starting points
        frontier = best_sets(cands, losses, width)
        info.rounds += 1
        info.trace.append({"candidates": len(cands), **_depth_stats(store)})
    info.scored_exactly = len(evaluated)
    info.depth_share = _shares(store.depth)
    info.outputs_per_token = store.outputs_per_token
    info.peak_bytes = store.peak_bytes
    return frontier[0], evaluated, info


def lazy_exhaustive(
    store: LazyOutputs, num_drop: int, objective: str, reduce: Reduce | None = None, pick_by: str = "estimate",
) -> tuple[Dropped, dict[Dropped, float], LazyInfo]:
    """The argmin over all C(E, R) dropped sets by branch and bound on exact lower bounds.

    Returns (best, exact scores of the candidates scored exactly, info); the discarded ones have
    no exact score (their bound already exceeds the best).
    """
    E, k = store.num_experts, store.k
    G = store.num_groups_total
    cands = list(itertools.combinations(range(E), num_drop))
    C = len(cands)
    keep_mask = keep_masks(cands, E)
    dropped_dev = (~keep_mask).to(store.order.device)
    cov = torch.zeros(C, G, dtype=torch.float64)  # squared error summed over covered tokens
    uncovered = torch.zeros(C, dtype=torch.float64)  # tokens not covered yet (summed over ranks)
    counted = torch.zeros_like(store.depth)  # depth up to which tokens' covered candidates are in cov
    alive = torch.ones(C, dtype=torch.bool)  # not discarded
    info = LazyInfo()
    exact: dict[Dropped, float] = {}

    def account() -> None:
        """Adds the errors of (candidate, token) pairs newly covered since the last call."""
        first = not bool((counted > 0).any())
        changed = store.depth > counted
        idx = torch.nonzero(alive if first else alive & (uncovered > 0)).squeeze(1)
        if idx.numel() == 0:
            counted.copy_(store.depth)
            return
        sub_keep, sub_dropped = keep_mask[idx], dropped_dev[idx]

        def compute() -> torch.Tensor:
            add = torch.zeros(idx.numel(), G + 1, dtype=torch.float64)  # last column: uncovered count
            if bool(changed.any()):
                for tok, err in store.token_errors(sub_keep, changed):
                    need = kth_kept_depth(store.order[tok], sub_dropped, k).cpu()  # [C', n]
                    depth, before = store.depth[tok].cpu(), counted[tok].cpu()
                    new = (need <= depth) & (need > before)
                    add[:, :G].index_add_(1, store.group[tok].cpu(), torch.where(new, err, torch.zeros_like(err)))
                    add[:, G] += ((need > depth).sum(1) if first else -new.sum(1)).to(torch.float64)
            return add

        add = compute() if reduce is None else reduce(compute)
        cov[idx] += add[:, :G]
        uncovered[idx] += add[:, G]
        counted.copy_(store.depth)

    while True:
        account()
        bound = objective_values(cov, objective)
        done = alive & (uncovered == 0)
        for i in torch.nonzero(done).squeeze(1).tolist():
            exact.setdefault(cands[i], float(bound[i].detach()))
        best = min(exact, key=lambda d: (exact[d], d)) if exact else None
        open_ = alive & (uncovered > 0)
        if best is not None:
            limit = exact[best] * (1 + BOUND_MARGIN) + 1e-300
            cut = open_ & (bound > limit)
            info.discarded_by_bound += int(cut.sum())
            alive &= ~cut
            open_ &= ~cut
        info.rounds += 1
        info.trace.append({"open": int(open_.sum()), "exact": len(exact), "discarded": info.discarded_by_bound,
                           **_depth_stats(store)})
        if not bool(open_.any()):
            break
        # Extend for the open candidate that looks best: its bound scaled to all tokens.
        total = store.num_tokens_total
        covered = (total - uncovered).clamp_min(1.0)
        if pick_by == "estimate":
            score = bound * torch.sqrt(total / covered) if objective == "paper" else bound * (total / covered)
        else:  # the smallest bound
            score = bound
        estimate = torch.where(open_, score, torch.full_like(score, float("inf")))
        pick = int(torch.argmin(estimate))  # ties: the lowest index, i.e. the smallest set
        need = kth_kept_depth(store.order, dropped_dev[pick], k)
        store.extend(need)
    info.scored_exactly = len(exact)
    info.outputs_per_token = store.outputs_per_token
    info.peak_bytes = store.peak_bytes
    best = min(exact, key=lambda d: (exact[d], d))
    floor = kth_kept_depth(store.order, dropped_dev[cands.index(best)], k).clamp_min(store.first_ranks)
    info.floor_outputs_per_token = float(floor.float().mean()) if floor.numel() else 0.0
    info.floor_share = _shares(floor)
    info.depth_share = _shares(store.depth)
    return best, exact, info


def run_lazy_search(
    method: str, store: LazyOutputs, num_drop: int, objective: str, beam_width: int = 4, reduce: Reduce | None = None
) -> tuple[Dropped, dict[Dropped, float], LazyInfo]:
    """``search.run_search`` over lazily computed outputs: (dropped, exact scores, what it cost)."""
    if objective not in ("paper", "mse"):
        raise ValueError(f"objective must be paper or mse; got {objective!r}")
    if num_drop == 0:
        return (), {}, LazyInfo(outputs_per_token=store.outputs_per_token, peak_bytes=store.peak_bytes)
    if method == "exhaustive":
        return lazy_exhaustive(store, num_drop, objective, reduce)
    if method == "greedy":
        return lazy_beam(store, num_drop, objective, 1, reduce)
    if method == "beam":
        return lazy_beam(store, num_drop, objective, beam_width, reduce)
    raise ValueError(f"unknown search {method!r}")
