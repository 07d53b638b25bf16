"""The four phases of pruning one MoE layer: collect -> score -> choose -> apply.

* collect: the calibration batches pass the layer once; per token the block's ranked expert
  outputs are reduced to what the objective needs (Gram entries, routing, target), and the
  unpruned hidden states move on to the next layer.
* score: a function from candidate dropped sets to their exact objective values, computed from
  the collected statistics alone (no expert runs again, except lazily deferred ones).
* choose: the subset search (exhaustive, greedy or beam) over those scores; every rank takes
  rank 0's choice.
* apply: progressive mode moves the pruned model's hidden states on, through the layer with only
  the kept experts routable.

A grouped router (``topk_group < n_group``) collects its tokens and a pool of expert outputs
instead (``grouped_outputs``), scores each candidate by routing every token with its mask, and
searches equal-per-group keep-sets only (``grouped_search``).

How the pipeline strings them together: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import torch
from torch import nn

from moe_fast.adapters import MoEAdapter
from moe_fast.layer_routing import layer_routing
from moe_fast.pruning.distributed import Dist
from moe_fast.masked_forward import MaskedForward
from moe_fast.pruning.expert_outputs import LayerStats, StatsForward
from moe_fast.pruning.grouped_outputs import GroupedOutputs, GroupedRecorder
from moe_fast.pruning.grouped_search import grouped_scorer, run_grouped_search
from moe_fast.pruning.hidden_states import HiddenStates
from moe_fast.pruning.lazy_outputs import LazyOutputs, LazyRecorder
from moe_fast.pruning.lazy_search import run_lazy_search
from moe_fast.pruning.report import LayerResult, loss_key
from moe_fast.pruning.search import Dropped, Scorer, make_scorer, run_search
from moe_fast.pruning.settings import SearchSpec
from moe_fast.pruning.source import LayerSource

Collected = dict[str, torch.Tensor | None] | LazyOutputs | GroupedOutputs  # rank-bounded statistics, lazy or grouped outputs
Found = tuple[Dropped, dict[Dropped, float], dict]  # (best dropped set, scores, report details)


class Scores(Protocol):
    def search(self, spec: SearchSpec) -> Found:
        """Runs ``spec``'s search over these scores."""


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


class LayerPruner:
    """The phases of one run, with what stays the same from layer to layer."""

    def __init__(
        self, adapter: MoEAdapter, spec: SearchSpec, ctx: Dist, num_batches: int, num_tokens: int,
        chunk_tokens: int, show_progress: bool = False,
    ) -> None:
        self.adapter, self.spec, self.ctx = adapter, spec, ctx
        self.num_batches, self.num_tokens = num_batches, num_tokens  # over all ranks
        self.chunk_tokens, self.show_progress = chunk_tokens, show_progress

    def collect(self, stream: HiddenStates, layer: nn.Module, block: nn.Module) -> Collected:
        """Rank-local: records the layer's statistics while ``stream`` passes it."""
        rank_bound = self.spec.rank_bound
        if self.spec.grouped:
            grouped = GroupedOutputs(self.adapter, block.experts, layer_routing(self.adapter, block))
            stream.record(layer, block, GroupedRecorder(self.adapter, block, grouped, self.chunk_tokens))
            grouped.finish()
            return grouped
        if self.spec.lazy:
            first, ahead = self.spec.recompute or (None, 0)
            store = LazyOutputs(self.adapter, block.experts, rank_bound, hold_outputs=self.spec.recompute is None, lookahead=ahead)
            stream.record(layer, block, LazyRecorder(self.adapter, block, store, self.chunk_tokens, first_ranks=first))
            store.finish()
            return store
        stats = LayerStats(rank_bound=rank_bound)
        stream.record(layer, block, StatsForward(self.adapter, block, rank_bound, stats, self.chunk_tokens))
        return stats.finish()

    def score(self, collected: Collected, desc: str = "candidates", block: nn.Module | None = None) -> Scores:
        """The objective over candidate dropped sets; data-parallel, the ranks' squared errors are summed.

        ``block``: the layer's MoE block, whose routing spec (``layer_routing``) scores the candidates
        (None: softmax over the adapter's top-k, as the stand-in adapters route)."""
        reduce = self.ctx.summed if self.ctx.active else None
        if isinstance(collected, GroupedOutputs):
            collected.num_groups_total = self.num_batches
            scorer = grouped_scorer(collected, self.spec.objective, self.num_batches, reduce,
                                    progress=self.show_progress, desc=desc)
            return GroupedScores(collected, scorer)
        if isinstance(collected, LazyOutputs):
            collected.num_groups_total, collected.num_tokens_total = self.num_batches, self.num_tokens
            return LazyScores(collected, self.ctx)
        scorer = make_scorer(
            collected, self.spec.num_experts, self.spec.top_k, self.adapter.renormalize, self.spec.objective,
            self.num_batches, progress=self.show_progress, desc=desc,
            reduce=reduce, routing=layer_routing(self.adapter, block),
        )
        state_bytes = sum(t.numel() * t.element_size() for t in collected.values() if t is not None)
        return BoundedScores(scorer, state_bytes)

    def choose(self, scores: Scores) -> LayerResult:
        """Collective: the search's best dropped set, rank 0's on every rank (they agree)."""
        dropped, losses, details = scores.search(self.spec)
        dropped = tuple(self.ctx.broadcast(tuple(dropped)))
        kept = [e for e in range(self.spec.num_experts) if e not in dropped]
        return LayerResult(kept, list(dropped), {loss_key(d): v for d, v in losses.items()}, self.spec.method, **details)

    def apply(self, stream: HiddenStates, layer: nn.Module, block: nn.Module | None, kept: list[int] | None) -> None:
        """Rank-local: progressive, the pruned stream passes the layer with only ``kept`` routable
        (None: whole, a dense layer). Layer-wise: nothing (collect moved the unpruned stream on)."""
        if stream.progressive:
            pruned_block = None if kept is None else MaskedForward(self.adapter, block, kept, chunk_tokens=self.chunk_tokens)
            stream.forward_pruned(layer, block, pruned_block)

    def replay(self, stream: HiddenStates, layer: nn.Module, block: nn.Module | None, done: LayerResult | None) -> None:
        """Rank-local: a layer without search (dense, or finished before a resume) only moves the streams on."""
        stream.forward_unpruned(layer)
        self.apply(stream, layer, block, None if block is None else done.kept)


@contextlib.contextmanager
def open_layer(source: LayerSource, index: int, ctx: Dist) -> Iterator[tuple[nn.Module, nn.Module | None]]:
    """(decoder layer, its MoE block or None) while the block runs; loading it is rank-local work."""
    with contextlib.ExitStack() as stack:
        with ctx.guard():
            layer = stack.enter_context(source.layer(index))
            block = source.adapter.moe_block(layer)
        yield layer, block
