"""The choices of a pruning run: checked once, and recorded in the report and the resume file.

A resume continues only under the same recorded settings, so everything that changes a
selection (the search, the calibration tokens, the dtype) belongs in :func:`run_settings`.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_fast.adapters import MoEAdapter
from moe_fast.pruning.grouped_search import balanced_count
from moe_fast.pruning.search import choose_search
from moe_fast.pruning.source import LayerSource
from moe_fast.kernels.routing_spec import RoutingSpec

MODES = ("layerwise", "progressive")
OBJECTIVES = ("paper", "mse")


def check_arguments(mode: str, objective: str, batch_size: int, beam_width: int = 4, chunk_tokens: int = 4096) -> None:
    """Refuses bad choices before any model or calibration file is read."""
    for name, value in (("beam_width", beam_width), ("chunk_tokens", chunk_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be layerwise or progressive; got {mode!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be paper or mse; got {objective!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def grouped_routing(adapter: MoEAdapter) -> RoutingSpec | None:
    """The adapter's config-level RoutingSpec when its router selects expert groups
    (``topk_group < n_group``), else None (stand-ins giving only E, k route by softmax)."""
    routing = adapter.routing() if hasattr(adapter, "routing") else None
    return routing if routing is not None and routing.grouped else None


def check_grouped_keep(adapter: MoEAdapter, num_keep: int) -> int:
    """A grouped router is searched over keep-sets with the same number of experts in every group
    (``grouped_search``), so ``num_keep`` must be one the pruned router can have: the adapter's
    ``check_keep`` rule (equal groups, at least 2 each, ``topk_group`` groups holding top-k) on the
    most even split of ``num_keep``. Returns the experts kept per group; raises before any forward."""
    spec = grouped_routing(adapter)
    n, E = spec.n_group, adapter.num_experts
    if E % n:
        raise ValueError(f"{adapter.family}: {E} experts do not split into n_group = {n} equal groups")
    size = E // n
    per, extra = divmod(num_keep, n)
    keep = [g * size + j for g in range(n) for j in range(per + (1 if g < extra else 0))]
    try:
        adapter.check_keep(keep)
    except ValueError as err:
        raise ValueError(
            f"keep = {num_keep} is not a keep size the grouped router of {adapter.family} can be pruned to "
            f"(n_group = {n} groups of {size} experts, topk_group = {spec.topk_group}, top-k = {spec.top_k}; "
            f"keep must be n_group x per_group with per_group >= 2 and topk_group x per_group >= top-k): {err}"
        ) from None
    return per


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
    lazy: bool  # expert outputs computed as candidates need them (lazy_search, grouped_outputs), not all up front
    n_group: int = 1  # > 1: a grouped router, searched over equal-per-group keep-sets (grouped_search)
    recompute: tuple[int, int] | None = None  # lean lazy search: (first ranks, lookahead); None: outputs held

    @property
    def num_drop(self) -> int:
        return self.num_experts - self.num_keep

    @property
    def grouped(self) -> bool:
        return self.n_group > 1

    def grouped_note(self) -> str | None:
        """The report's ``grouped_search`` entry (None without groups)."""
        if not self.grouped:
            return None
        size = self.num_experts // self.n_group
        return f"equal experts per group (n_group={self.n_group}, per group {self.num_keep // self.n_group} of {size})"

    @property
    def rank_bound(self) -> int:
        """M = k + E - R: the ranked experts per token that every candidate's routing stays within."""
        return self.top_k + self.num_drop

    @classmethod
    def build(
        cls, adapter: MoEAdapter, num_keep: int, search: str, beam_width: int, objective: str,
        lazy: bool | None, recompute_outputs: bool | tuple[int, int] = False,
    ) -> "SearchSpec":
        """``lazy`` None: lazy for greedy and beam, rank-bounded for exhaustive search; routers other
        than plain softmax (``lazy_supported``) use the rank-bounded search, and refuse
        ``lazy=True``. Grouped routers (``topk_group < n_group``) always use the grouped search
        (``grouped_search``: equal experts per group, outputs computed as candidates need them, so
        ``lazy`` None or True; False is refused). Data-parallel runs take any of them alike: each
        sums its errors over ranks."""
        grouped = grouped_routing(adapter)
        if grouped is not None and lazy is False:
            raise ValueError(
                f"{adapter.family}'s router selects expert groups (n_group = {grouped.n_group}, topk_group = "
                f"{grouped.topk_group}): the rank-bounded search (lazy=False) does not serve it; leave lazy unset "
                "for the grouped search, which computes expert outputs as candidates need them"
            )
        if lazy and grouped is None and not lazy_supported(adapter):
            raise ValueError(
                f"lazy search for {adapter.family} ({adapter.routing().scoring} routing) is not implemented: "
                "it scores softmax routers only; use the rank-bounded search (lazy=False, or leave it unset)"
            )
        num_experts, top_k = adapter.num_experts, adapter.top_k
        if not top_k <= num_keep < num_experts:
            raise ValueError(f"keep must satisfy top-k ({top_k}) <= keep < number of experts ({num_experts}); got {num_keep}")
        if grouped is not None:
            if recompute_outputs:
                raise ValueError(f"recompute_outputs serves the lazy search of softmax routers; {adapter.family}'s "
                                 "grouped router is searched by the grouped search (leave recompute_outputs unset)")
            check_grouped_keep(adapter, num_keep)
            count = balanced_count(num_experts, grouped.n_group, num_experts - num_keep)
            method = choose_search(search, num_experts, num_keep, num_candidates=count)
            return cls(num_experts, top_k, num_keep, method, beam_width, objective, True, grouped.n_group)
        method = choose_search(search, num_experts, num_keep)
        use_lazy = (method != "exhaustive" if lazy is None else lazy) and lazy_supported(adapter)
        recompute = resolve_recompute(recompute_outputs, top_k, top_k + num_experts - num_keep)
        if recompute is not None and not use_lazy:
            raise ValueError("recompute_outputs serves the lazy search only: pass lazy=True (or leave it unset with "
                             "greedy or beam search) on a plain softmax router")
        return cls(num_experts, top_k, num_keep, method, beam_width, objective, use_lazy, recompute=recompute)


def criterion_spec(
    adapter: MoEAdapter, num_keep: int, criterion: str, search: str = "auto", lazy: bool | None = None,
    recompute_outputs: bool | tuple[int, int] = False,
) -> SearchSpec:
    """The spec of a statistic criterion's run (``method`` is the criterion's name): the keep
    rules as for the search, a grouped router's keep split evenly over its groups; the search's own
    options are refused, since no search runs."""
    if search != "auto" or lazy is not None or recompute_outputs:
        raise ValueError(f"criterion {criterion!r} keeps the highest-scoring experts without a search: search, lazy and "
                         "recompute_outputs apply to criterion='reconstruction' only (leave them unset)")
    num_experts, top_k = adapter.num_experts, adapter.top_k
    if not top_k <= num_keep < num_experts:
        raise ValueError(f"keep must satisfy top-k ({top_k}) <= keep < number of experts ({num_experts}); got {num_keep}")
    routing = adapter.routing() if hasattr(adapter, "routing") else None
    n_group = 1 if routing is None else max(1, int(routing.n_group or 1))
    if n_group > 1:
        check_equal_groups(adapter, num_keep, n_group)
    return SearchSpec(num_experts, top_k, num_keep, criterion, 1, "paper", False)


def check_equal_groups(adapter: MoEAdapter, num_keep: int, n_group: int) -> None:
    """A router with expert groups keeps the same number in each: ``num_keep`` must split evenly
    and satisfy the adapter's keep rule (refused before any forward)."""
    E = adapter.num_experts
    if num_keep % n_group:
        raise ValueError(f"{adapter.family}'s router has {n_group} expert groups and keeps the same number of experts in "
                         f"each; keep = {num_keep} does not split into {n_group} equal parts")
    size, per = E // n_group, num_keep // n_group
    adapter.check_keep([g * size + j for g in range(n_group) for j in range(per)])


def resolve_recompute(value: bool | tuple[int, int] | list[int], top_k: int, rank_bound: int) -> tuple[int, int] | None:
    """``recompute_outputs`` as (first ranks, lookahead): False -> None, True -> the defaults
    (2k + 2 first ranks, lookahead ceil(3k/4): 18 and 6 for k = 8, the setting that met both goals
    in benchmarks/RESULTS.md), a pair as given (first ranks >= k + 1,
    lookahead >= 0; first ranks clamped to the rank bound)."""
    if value is False or value is None:
        return None
    if value is True:
        first, ahead = 2 * top_k + 2, (3 * top_k + 3) // 4
    else:
        try:
            first, ahead = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"recompute_outputs must be a bool or a pair (first_ranks, lookahead), got {value!r}") from None
        if first < top_k + 1 or ahead < 0:
            raise ValueError(f"recompute_outputs (first_ranks, lookahead) needs first_ranks >= top-k + 1 = {top_k + 1} "
                             f"and lookahead >= 0, got ({first}, {ahead})")
    return min(first, rank_bound), ahead



def run_settings(
    spec: SearchSpec, mode: str, source: LayerSource, calibration: dict, repair: str | None = None,
    criterion: str = "reconstruction", seed: int | None = None,
) -> dict:
    """The report's ``settings`` (its keys and their order are part of the report format; ``repair``
    and ``criterion`` appear only when a repair ran or a statistic criterion chose, so that
    reconstruction runs without a repair keep their reports as they were). ``seed``: random's draw."""
    settings = {
        "keep": spec.num_keep, "num_experts": spec.num_experts, "top_k": spec.top_k, "mode": mode,
        "objective": spec.objective, "search": spec.method,
        "beam_width": spec.beam_width if spec.method == "beam" else None, "rank_bound": spec.rank_bound,
        "lazy": spec.lazy,
        "recompute_outputs": None if spec.recompute is None else dict(zip(("first_ranks", "lookahead"), spec.recompute)),
        **({"grouped_search": spec.grouped_note()} if spec.grouped else {}), "model_type": source.config.model_type, "dtype": str(source.dtype).replace("torch.", ""),
        "calibration": calibration,
    }
    if repair is not None:
        settings["repair"] = repair
    if criterion != "reconstruction":
        settings.update(criterion=criterion, rank_bound=None, **({"seed": seed} if criterion == "random" else {}))
    return settings
