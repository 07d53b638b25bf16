"""The literature's selection criteria as pruning strategies: one score per expert, keep the largest.

* ``frequency``: how often an expert is in a token's top-k on the calibration tokens;
* ``reap``: router-weighted expert activation norm: per expert, the mean over the tokens routed
  to it of (its routing weight as the model applies it) x ||expert output||_2 (``saliency`` is
  an alias);
* ``ean``: the same mean without the routing weight;
* ``random``: R experts drawn uniformly, one draw per MoE layer in depth order from one seed.

Why strategies: they then stream one decoder layer at a time through ``moe_fast.prune`` like the
reconstruction search (memory flat in depth, resume, torchrun, the same export and report). The
statistics are taken the way a forward hook on the stock experts module would take them (the
block runs as stock; each routed expert's output is recomputed per token group), summed in float64
over data-parallel ranks. A grouped router (``n_group > 1``) keeps the same number of experts in
every group: each group keeps its own best (or randomly drawn) ``R / n_group``.
"""

from __future__ import annotations

import random
from typing import Callable

import torch
from torch import nn

from moe_fast.adapters import MoEAdapter
from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.hidden_states import HiddenStates
from moe_fast.pruning.report import LayerResult
from moe_fast.pruning.settings import SearchSpec

CRITERIA = ("random", "frequency", "reap", "ean")
ALIASES = {"saliency": "reap"}


def canonical_criterion(name: str) -> str:
    """The criterion's own name (``saliency`` -> ``reap``; ``reconstruction`` is the paper's
    search), or a ValueError naming the choices."""
    name = ALIASES.get(name, name)
    if name != "reconstruction" and name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose from reconstruction, {', '.join(CRITERIA + tuple(ALIASES))}")
    return name


def top_scores(scores: torch.Tensor | list[float], num_keep: int) -> list[int]:
    """Indices of the ``num_keep`` largest scores (ties: lower index first), sorted."""
    values = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    if not 1 <= num_keep <= len(values):
        raise ValueError(f"keep must be in [1, {len(values)}], got {num_keep}")
    order = sorted(range(len(values)), key=lambda e: (-values[e], e))
    return sorted(order[:num_keep])


def select_random(num_experts: int, num_keep: int, seed: int | random.Random) -> list[int]:
    """``num_keep`` experts drawn uniformly without replacement, sorted."""
    if not 1 <= num_keep <= num_experts:
        raise ValueError(f"keep must be in [1, {num_experts}], got {num_keep}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return sorted(rng.sample(range(num_experts), num_keep))


def scores_from_sums(counts: torch.Tensor, weighted_norms: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reap, ean) per expert from sums over routed tokens; 0 for an expert no token reached."""
    routed = counts.clamp_min(1)
    zero = torch.zeros_like(weighted_norms)
    return torch.where(counts > 0, weighted_norms / routed, zero), torch.where(counts > 0, norms / routed, zero)


def layer_scores_from_ranked(
    ids: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts, reap, ean) of one layer from each token's routed experts.

    ``ids`` [T, k] the top-k experts, ``weights`` [T, k] their routing weights, ``norms`` [T, k]
    the L2 norms of their outputs. Why: the pruning search already computes these outputs (their
    Gram diagonal holds the squared norms), so every criterion can come from one pass.
    """
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts).double()
    wn = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, flat, (weights.double() * norms.double()).reshape(-1))
    n = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, flat, norms.double().reshape(-1))
    reap, ean = scores_from_sums(counts, wn, n)
    return counts, reap, ean


def per_group(num_experts: int, n_group: int, num_keep: int, pick: Callable[[list[int], int], list[int]]) -> list[int]:
    """Keep-set with ``num_keep / n_group`` experts from every group, each group's chosen by
    ``pick(group experts, count)`` (one group: ``pick`` over all experts)."""
    size, per = num_experts // n_group, num_keep // n_group
    kept: list[int] = []
    for g in range(n_group):
        kept += pick(list(range(g * size, (g + 1) * size)), per)
    return sorted(kept)


class ActivationSums:
    """Per-expert sums of one layer on this rank: top-k appearances, weight x norm, norm."""

    def __init__(self, num_experts: int) -> None:
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.weighted_norms = torch.zeros(num_experts, dtype=torch.float64)
        self.norms = torch.zeros(num_experts, dtype=torch.float64)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.counts, self.weighted_norms, self.norms])


class ActivationRecorder:
    """A block forward that runs the stock block and, on the way, adds every routed (token,
    expert) pair's output norm to ``sums`` (a pre-hook on the experts module sees the hidden
    states, the top-k ids and the routing weights the block hands its experts)."""

    def __init__(self, adapter: MoEAdapter, block: nn.Module, sums: ActivationSums) -> None:
        self.adapter, self.block, self.sums = adapter, block, sums
        self.group_id = 0  # set by HiddenStates.record (unused: the criteria sum over every batch)
        self.target: torch.Tensor | None = None  # progressive target (unused: the criteria need none)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        hidden, index, weights = (list(args) + [kwargs[n] for n in names if n in kwargs])[:3]
        s = self.sums
        for e in range(s.counts.numel()):
            tok, slot = torch.where(index == e)
            if tok.numel() == 0:
                continue
            norm = self.adapter.expert_forward(module, e, hidden[tok]).float().norm(dim=-1).double().cpu()
            s.counts[e] += tok.numel()
            s.weighted_norms[e] += (weights[tok, slot].double().cpu() * norm).sum()
            s.norms[e] += norm.sum()

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs):
        handle = self.block.experts.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            return type(self.block).forward(self.block, hidden_states, *args, **kwargs)
        finally:
            handle.remove()


class CriterionScores:
    """One layer's per-expert scores of every statistic criterion, summed over ranks."""

    def __init__(self, sums: torch.Tensor, tokens: int) -> None:
        counts, weighted, norms = sums
        self.counts = counts
        self.reap, self.ean = scores_from_sums(counts, weighted, norms)
        self.tokens = tokens

    def of(self, criterion: str) -> torch.Tensor:
        return {"frequency": self.counts, "reap": self.reap, "ean": self.ean}[criterion]


class ActivationCriterion:
    """``frequency``, ``reap`` or ``ean``: the stock block runs once per calibration batch; the
    experts' routed outputs give the scores; the layer keeps the largest (per group)."""

    needs_forward = True

    def __init__(self, criterion: str, adapter: MoEAdapter, spec: SearchSpec, ctx: Dist) -> None:
        self.criterion, self.adapter, self.spec, self.ctx = criterion, adapter, spec, ctx
        self.n_group = group_count(adapter)

    def collect(self, stream: HiddenStates, layer: nn.Module, block: nn.Module) -> ActivationSums:
        sums = ActivationSums(self.spec.num_experts)
        stream.record(layer, block, ActivationRecorder(self.adapter, block, sums))
        return sums

    def score(self, collected: ActivationSums, block: nn.Module | None = None, desc: str = "") -> CriterionScores:
        """Collective: the sums over every rank's batches."""
        return CriterionScores(self.ctx.sum(collected.stacked()), 0)

    def choose(self, scores: CriterionScores, layer_index: int) -> LayerResult:
        values = scores.of(self.criterion).tolist()
        kept = per_group(self.spec.num_experts, self.n_group, self.spec.num_keep,
                         lambda group, n: [group[i] for i in top_scores([values[e] for e in group], n)])
        self.adapter.check_keep(kept)
        dropped = [e for e in range(self.spec.num_experts) if e not in kept]
        return LayerResult(kept, dropped, {}, self.criterion, criterion_scores=[round(v, 9) for v in values])


class RandomCriterion:
    """``random``: no calibration forward; the draws come from one ``random.Random(seed)`` in depth
    order over the MoE layers, so a resumed run draws what an uninterrupted one drew."""

    needs_forward = False

    def __init__(self, adapter: MoEAdapter, spec: SearchSpec, seed: int, moe_layers: list[int]) -> None:
        self.adapter, self.spec = adapter, spec
        rng = random.Random(seed)
        n_group = group_count(adapter)
        self.kept = {layer: per_group(spec.num_experts, n_group, spec.num_keep,
                                      lambda group, n: sorted(rng.sample(group, n))) for layer in moe_layers}

    def collect(self, stream: HiddenStates | None, layer: nn.Module, block: nn.Module) -> None:
        return None

    def score(self, collected: None, block: nn.Module | None = None, desc: str = "") -> None:
        return None

    def choose(self, scores: None, layer_index: int) -> LayerResult:
        kept = self.kept[layer_index]
        self.adapter.check_keep(kept)
        dropped = [e for e in range(self.spec.num_experts) if e not in kept]
        return LayerResult(kept, dropped, {}, "random")


def group_count(adapter: MoEAdapter) -> int:
    """Expert groups a pruned router must keep equal (1 for routers without groups)."""
    routing = adapter.routing() if hasattr(adapter, "routing") else None
    return 1 if routing is None else max(1, int(getattr(routing, "n_group", 1) or 1))
