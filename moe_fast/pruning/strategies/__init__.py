"""How one MoE layer's experts are chosen: a strategy per selection rule, picked once per run.

Every strategy has the same three phases, so the pipeline (``pruning.pipeline``) streams,
resumes, locks, runs data-parallel and exports the same way whatever chooses the experts:

* ``collect(stream, layer, block)``: rank-local; the calibration batches pass the layer once
  (``HiddenStates.record``) and the strategy keeps what it needs of them;
* ``score(collected, block, desc)``: what the choice is made from (candidate losses, or one score
  per expert), summed over data-parallel ranks;
* ``choose(scores)``: the layer's ``LayerResult``; every rank gets the same one.

The reconstruction searches of the paper (``reconstruction``: rank-bounded, lazy and lean lazy,
grouped) and the literature's criteria (``criteria``: frequency, REAP, EAN, random) are the
strategies; :func:`make_strategy` picks one from the run's ``SearchSpec`` and criterion.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from moe_fast.adapters import MoEAdapter
from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.hidden_states import HiddenStates
from moe_fast.pruning.report import LayerResult
from moe_fast.pruning.settings import SearchSpec
from moe_fast.pruning.strategies.criteria import CRITERIA, ActivationCriterion, RandomCriterion, canonical_criterion
from moe_fast.pruning.strategies.reconstruction import (
    BoundedReconstruction, GroupedReconstruction, LazyReconstruction, RunShape,
)

__all__ = ["CRITERIA", "Strategy", "RunShape", "canonical_criterion", "make_strategy"]


class Strategy(Protocol):
    """One selection rule's phases for one MoE layer (see the module docstring)."""

    needs_forward: bool  # False: the choice does not look at calibration tokens (random)

    def collect(self, stream: HiddenStates, layer: nn.Module, block: nn.Module) -> Any: ...

    def score(self, collected: Any, block: nn.Module | None = None, desc: str = "candidates") -> Any: ...

    def choose(self, scores: Any, layer_index: int) -> LayerResult: ...


def make_strategy(
    criterion: str, adapter: MoEAdapter, spec: SearchSpec, ctx: Dist, shape: RunShape, seed: int = 42,
    moe_layers: list[int] | None = None,
) -> Strategy:
    """The strategy of ``criterion`` (``reconstruction`` or one of ``CRITERIA``); for
    reconstruction, the search ``spec`` resolved to (grouped, lazy or rank-bounded)."""
    criterion = canonical_criterion(criterion)
    if criterion == "random":
        return RandomCriterion(adapter, spec, seed, moe_layers or [])
    if criterion != "reconstruction":
        return ActivationCriterion(criterion, adapter, spec, ctx)
    if spec.grouped:
        return GroupedReconstruction(adapter, spec, ctx, shape)
    if spec.lazy:
        return LazyReconstruction(adapter, spec, ctx, shape)
    return BoundedReconstruction(adapter, spec, ctx, shape)
