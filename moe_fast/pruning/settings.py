"""The choices of a pruning run: checked once, and recorded in the report and the resume file.

A resume continues only under the same recorded settings, so everything that changes a
selection (the search, the calibration tokens, the dtype) belongs in :func:`run_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_fast.adapters import MoEAdapter
from moe_fast.pruning.search import choose_search
from moe_fast.pruning.source import LayerSource

MODES = ("layerwise", "progressive")
OBJECTIVES = ("paper", "mse")


def check_arguments(mode: str, objective: str, batch_size: int) -> None:
    """Refuses bad choices before any model or calibration file is read."""
    if mode not in MODES:
        raise ValueError(f"mode must be layerwise or progressive; got {mode!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be paper or mse; got {objective!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def refuse_unsupported_routing(adapter: MoEAdapter) -> None:
    """Grouped routers (``topk_group < n_group``) are refused: a candidate's experts then depend on
    the group scores of the experts it keeps, not on a prefix of the ranked row, so the rank-bounded
    subset losses would be searched wrong without a word. Non-grouped routers of every scoring
    (softmax, sigmoid with a selection bias, softmax_topk) are searched exactly."""
    routing = adapter.routing() if hasattr(adapter, "routing") else None  # stand-ins giving only E, k route by softmax
    if routing is not None and routing.grouped:
        raise ValueError(
            f"pruning search for {adapter.family} needs subset_loss support for {routing.scoring}/groups: not implemented yet "
            f"(n_group = {routing.n_group}, topk_group = {routing.topk_group}; only routers without group selection are searched)"
        )


def lazy_supported(adapter: MoEAdapter) -> bool:
    """The lazy search scores with softmax subset losses only; other routers use the rank-bounded search."""
    routing = adapter.routing() if hasattr(adapter, "routing") else None
    return routing is None or routing.is_plain_softmax


@dataclass(frozen=True)
class SearchSpec:
    """How every MoE layer's experts are chosen in one run."""

    num_experts: int  # E
    top_k: int  # k
    num_keep: int  # R, experts kept per layer
    method: str  # exhaustive, greedy or beam ("auto" resolved)
    beam_width: int
    objective: str  # paper or mse
    lazy: bool  # expert outputs computed as candidates need them (lazy_search), not all up front

    @property
    def num_drop(self) -> int:
        return self.num_experts - self.num_keep

    @property
    def rank_bound(self) -> int:
        """M = k + E - R: the ranked experts per token that every candidate's routing stays within."""
        return self.top_k + self.num_drop

    @classmethod
    def build(
        cls, adapter: MoEAdapter, num_keep: int, search: str, beam_width: int, objective: str,
        lazy: bool | None,
    ) -> "SearchSpec":
        """``lazy`` None: lazy for greedy and beam, rank-bounded for exhaustive search; routers other
        than plain softmax (``lazy_supported``) always use the rank-bounded search, and refuse
        ``lazy=True``. Data-parallel runs take either search alike: both sum their errors over ranks."""
        refuse_unsupported_routing(adapter)
        if lazy and not lazy_supported(adapter):
            raise ValueError(
                f"lazy search for {adapter.family} ({adapter.routing().scoring} routing) is not implemented: "
                "it scores softmax routers only; use the rank-bounded search (lazy=False, or leave it unset)"
            )
        num_experts, top_k = adapter.num_experts, adapter.top_k
        if not top_k <= num_keep < num_experts:
            raise ValueError(f"keep must satisfy top-k ({top_k}) <= keep < number of experts ({num_experts}); got {num_keep}")
        method = choose_search(search, num_experts, num_keep)
        use_lazy = (method != "exhaustive" if lazy is None else lazy) and lazy_supported(adapter)
        return cls(num_experts, top_k, num_keep, method, beam_width, objective, use_lazy)


def run_settings(spec: SearchSpec, mode: str, source: LayerSource, calibration: dict) -> dict:
    """The report's ``settings`` (its keys and their order are part of the report format)."""
    return {
        "keep": spec.num_keep, "num_experts": spec.num_experts, "top_k": spec.top_k, "mode": mode,
        "objective": spec.objective, "search": spec.method,
        "beam_width": spec.beam_width if spec.method == "beam" else None, "rank_bound": spec.rank_bound,
        "lazy": spec.lazy, "model_type": source.config.model_type, "dtype": str(source.dtype).replace("torch.", ""),
        "calibration": calibration,
    }
