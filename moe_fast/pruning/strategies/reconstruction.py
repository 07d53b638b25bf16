"""The paper's reconstruction search as strategies: which experts' removal changes the layer output least.

* ``BoundedReconstruction``: every token's M = k + E - R ranked expert outputs run up front and
  are reduced to Gram entries (``expert_outputs``); candidates are scored by ``ops.subset_loss``.
* ``LazyReconstruction``: outputs computed only as far as a candidate still in the running needs
  them (``lazy_outputs``, ``lazy_search``), optionally holding Gram entries instead of outputs.
* ``GroupedReconstruction``: a grouped router (``topk_group < n_group``); each candidate routes
  every token with its mask, over equal-per-group keep-sets (``grouped_outputs``, ``grouped_search``).

Data-parallel, the candidates' squared errors are summed over ranks before the square roots, and
rank 0's choice is every rank's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.adapters import MoEAdapter
from moe_fast.routing.layer_routing import layer_routing
from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.expert_outputs import LayerStats, StatsForward
from moe_fast.pruning.grouped_outputs import GroupedOutputs, GroupedRecorder
from moe_fast.pruning.grouped_search import grouped_scorer, run_grouped_search
from moe_fast.pruning.hidden_states import HiddenStates
from moe_fast.pruning.lazy_outputs import LazyOutputs, LazyRecorder
from moe_fast.pruning.lazy_search import run_lazy_search
from moe_fast.pruning.report import LayerResult, loss_key
from moe_fast.pruning.search import Dropped, Scorer, make_scorer, run_search
from moe_fast.pruning.settings import SearchSpec

Found = tuple[Dropped, dict[Dropped, float], dict]  # (best dropped set, scores, report details)


@dataclass(frozen=True)
class RunShape:
    """What the reconstruction strategies need of the run besides the search: its size and chunking."""

    num_batches: int  # calibration batches over all ranks: the terms of the paper's objective
    num_tokens: int  # calibration tokens over all ranks
    chunk_tokens: int  # tokens whose expert outputs are held at once
    show_progress: bool = False


class BoundedScores:
    """Scores from the rank-bounded statistics: every token's M = k + E - R outputs ran up front."""

    def __init__(self, scorer: Scorer, state_bytes: int) -> None:
        self.scorer, self.state_bytes = scorer, state_bytes

    def search(self, spec: SearchSpec) -> Found:
        dropped, losses = run_search(spec.method, self.scorer, spec.num_experts, spec.num_drop, spec.beam_width)
        return dropped, losses, {"search_state_bytes": self.state_bytes}


class LazyScores:
    """Scores over lazily computed outputs: the search extends tokens only as far as it needs.

    Data-parallel, each rank extends its own tokens (the frontier and the picks follow from errors
    summed over ranks, so every rank decides alike) and the outputs per token are counted over all."""

    def __init__(self, store: LazyOutputs, ctx: Dist) -> None:
        self.store, self.ctx = store, ctx

    def search(self, spec: SearchSpec) -> Found:
        reduce = self.ctx.summed if self.ctx.active else None
        dropped, losses, info = run_lazy_search(spec.method, self.store, spec.num_drop, spec.objective, spec.beam_width, reduce)
        store = self.store
        counts = torch.tensor([store.outputs_computed, store.outputs_recomputed, store.num_tokens], dtype=torch.float64)
        outputs, recomputed, tokens = self.ctx.sum(counts).tolist() if self.ctx.active else counts.tolist()
        details = {
            "expert_outputs_per_token": round(outputs / max(1.0, tokens), 4), "scored_exactly": info.scored_exactly,
            "discarded_by_bound": info.discarded_by_bound if spec.method == "exhaustive" else None,
            "search_state_bytes": info.peak_bytes,
            "lazy_detail": {**info.summary(), "recomputed_outputs_per_token": round(recomputed / max(1.0, tokens), 4)},
        }
        return dropped, losses, details


class GroupedScores:
    """Scores of a grouped router's equal-per-group keep-sets: each candidate routes every token,
    and expert outputs are computed the first time a candidate chooses them."""

    def __init__(self, store: GroupedOutputs, scorer: Scorer) -> None:
        self.store, self.scorer = store, scorer

    def search(self, spec: SearchSpec) -> Found:
        dropped, losses = run_grouped_search(
            spec.method, self.scorer, spec.num_experts, spec.n_group, spec.num_drop, spec.beam_width,
            on_frontier=self.store.set_frontier,
        )
        details = {"expert_outputs_per_token": round(self.store.outputs_per_token, 4), "scored_exactly": len(losses),
                   "search_state_bytes": self.store.peak_bytes}
        return dropped, losses, details


class _Reconstruction:
    """The choose phase the three searches share: run the search, take rank 0's pick."""

    needs_forward = True

    def __init__(self, adapter: MoEAdapter, spec: SearchSpec, ctx: Dist, shape: RunShape) -> None:
        self.adapter, self.spec, self.ctx, self.shape = adapter, spec, ctx, shape

    @property
    def reduce(self):
        return self.ctx.summed if self.ctx.active else None

    def choose(self, scores: BoundedScores | LazyScores | GroupedScores, layer_index: int | None = None) -> LayerResult:
        """Collective: the search's best dropped set, rank 0's on every rank (they agree)."""
        dropped, losses, details = scores.search(self.spec)
        dropped = tuple(self.ctx.broadcast(tuple(dropped)))
        kept = [e for e in range(self.spec.num_experts) if e not in dropped]
        return LayerResult(kept, list(dropped), {loss_key(d): v for d, v in losses.items()}, self.spec.method, **details)


class BoundedReconstruction(_Reconstruction):
    def collect(self, stream: HiddenStates, layer: nn.Module, block: nn.Module) -> dict[str, torch.Tensor | None]:
        """Rank-local: every token's rank-bounded Gram entries, ids, logits and target."""
        stats = LayerStats(rank_bound=self.spec.rank_bound)
        stream.record(layer, block, StatsForward(self.adapter, block, self.spec.rank_bound, stats, self.shape.chunk_tokens))
        return stats.finish()

    def score(self, collected: dict, block: nn.Module | None = None, desc: str = "candidates") -> BoundedScores:
        """``block``: the layer's MoE block, whose routing spec (``layer_routing``) scores the candidates
        (None: softmax over the adapter's top-k, as the stand-in adapters route)."""
        spec = self.spec
        scorer = make_scorer(
            collected, spec.num_experts, spec.top_k, self.adapter.renormalize, spec.objective, self.shape.num_batches,
            progress=self.shape.show_progress, desc=desc, reduce=self.reduce, routing=layer_routing(self.adapter, block),
        )
        state_bytes = sum(t.numel() * t.element_size() for t in collected.values() if t is not None)
        return BoundedScores(scorer, state_bytes)


class LazyReconstruction(_Reconstruction):
    def collect(self, stream: HiddenStates, layer: nn.Module, block: nn.Module) -> LazyOutputs:
        """Rank-local: the first ranks' outputs (or, lean, their Gram entries) of every token."""
        first, ahead = self.spec.recompute or (None, 0)
        store = LazyOutputs(self.adapter, block.experts, self.spec.rank_bound, hold_outputs=self.spec.recompute is None,
                            lookahead=ahead)
        stream.record(layer, block, LazyRecorder(self.adapter, block, store, self.shape.chunk_tokens, first_ranks=first))
        store.finish()
        return store

    def score(self, collected: LazyOutputs, block: nn.Module | None = None, desc: str = "candidates") -> LazyScores:
        collected.num_groups_total, collected.num_tokens_total = self.shape.num_batches, self.shape.num_tokens
        return LazyScores(collected, self.ctx)


class GroupedReconstruction(_Reconstruction):
    def collect(self, stream: HiddenStates, layer: nn.Module, block: nn.Module) -> GroupedOutputs:
        """Rank-local: the tokens and a pool of expert outputs filled as candidates need them."""
        grouped = GroupedOutputs(self.adapter, block.experts, layer_routing(self.adapter, block))
        stream.record(layer, block, GroupedRecorder(self.adapter, block, grouped, self.shape.chunk_tokens))
        grouped.finish()
        return grouped

    def score(self, collected: GroupedOutputs, block: nn.Module | None = None, desc: str = "candidates") -> GroupedScores:
        collected.num_groups_total = self.shape.num_batches
        scorer = grouped_scorer(collected, self.spec.objective, self.shape.num_batches, self.reduce,
                                progress=self.shape.show_progress, desc=desc)
        return GroupedScores(collected, scorer)
