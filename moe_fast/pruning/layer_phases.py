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

What collect keeps, how it is scored and chosen is the run's strategy (``pruning.strategies``):
the reconstruction searches (rank-bounded, lazy, grouped) or a statistic criterion (frequency,
REAP, EAN, random).

How the pipeline strings them together: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from moe_fast.adapters import MoEAdapter
from moe_fast.routing.masked_forward import MaskedForward
from moe_fast.host.ram import release_freed_memory
from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.hidden_states import HiddenStates
from moe_fast.pruning.report import LayerResult
from moe_fast.pruning.settings import SearchSpec
from moe_fast.pruning.source import LayerSource
from moe_fast.pruning.strategies import RunShape, Strategy, make_strategy


class LayerPruner:
    """The phases of one run, with what stays the same from layer to layer: the selection rule
    (a ``strategies`` object, chosen once) collects, scores and chooses; ``apply`` and ``replay``
    move the streams on."""

    def __init__(
        self, adapter: MoEAdapter, spec: SearchSpec, ctx: Dist, num_batches: int, num_tokens: int,
        chunk_tokens: int, show_progress: bool = False, strategy: Strategy | None = None,
    ) -> None:
        self.adapter, self.spec, self.ctx = adapter, spec, ctx
        self.chunk_tokens = chunk_tokens
        shape = RunShape(num_batches, num_tokens, chunk_tokens, show_progress)
        self.strategy = strategy or make_strategy("reconstruction", adapter, spec, ctx, shape)

    @property
    def needs_forward(self) -> bool:
        """False when the choice looks at no calibration token (random): no stream is needed."""
        return self.strategy.needs_forward

    def collect(self, stream: HiddenStates, layer: nn.Module, block: nn.Module):
        """Rank-local: records the layer's statistics while ``stream`` passes it."""
        return self.strategy.collect(stream, layer, block)

    def score(self, collected, desc: str = "candidates", block: nn.Module | None = None):
        """Collective: what the choice is made from, summed over data-parallel ranks."""
        return self.strategy.score(collected, block, desc)

    def choose(self, scores, layer_index: int | None = None) -> LayerResult:
        """Collective: the layer's result, the same on every rank."""
        return self.strategy.choose(scores, layer_index)

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
    """(decoder layer, its MoE block or None) while the block runs; loading it is rank-local work.
    Afterwards the freed layer's heap pages go back to the system (peak memory flat in depth)."""
    try:
        with contextlib.ExitStack() as stack:
            with ctx.guard():
                layer = stack.enter_context(source.layer(index))
                block = source.adapter.moe_block(layer)
            yield layer, block
    finally:
        release_freed_memory()
