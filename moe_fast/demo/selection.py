"""Every criterion's selection from one pass over a calibration sample.

Why one pass: with the rank bound of the smallest r, each token's ranked expert outputs, their
Gram entries and the unpruned routing weights are everything the reconstruction search needs
for every larger r as well, and the top-k slots among them give the frequency counts and the
activation norms (the Gram diagonal) that ``reap`` and ``ean`` need. Layer-wise inputs do not
depend on r, so one pass serves the whole table; progressive pruning runs ``moe_fast.prune``
once per r (its inputs change with r).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.adapters import get_adapter
from moe_fast.baselines import layer_scores_from_ranked, select_random, top_scores
from moe_fast.layer_routing import layer_routing
from moe_fast.pruning.expert_outputs import LayerStats, StatsForward
from moe_fast.pruning.settings import grouped_routing
from moe_fast.pruning.search import make_scorer, run_search
from moe_fast.routing_spec import RoutingSpec


@dataclass(frozen=True)
class Selection:
    """Experts kept per MoE layer by one method at one r on one calibration sample."""

    method: str  # layer-wise | progressive | greedy | beam | frequency | reap | ean | random
    num_keep: int  # experts kept per layer (r)
    calib: str | None  # prose | code | None (random)
    seed: int | None  # calibration sample (or random draw)
    kept: tuple[tuple[int, tuple[int, ...]], ...]  # ((layer, kept experts), ...)

    @property
    def kept_dict(self) -> dict[int, list[int]]:
        return {layer: list(experts) for layer, experts in self.kept}


def _freeze(kept: dict[int, list[int]]) -> tuple[tuple[int, tuple[int, ...]], ...]:
    return tuple((int(layer), tuple(sorted(int(e) for e in experts))) for layer, experts in sorted(kept.items()))


def gram_diagonal(gram: torch.Tensor, m: int, slots: int) -> torch.Tensor:
    """[T, slots] squared output norms of the first ``slots`` ranks from packed Gram rows [T, m(m+1)/2]."""
    index = [j * m - j * (j - 1) // 2 for j in range(slots)]  # (j, j) in the row-by-row upper triangle
    return gram[:, index]


@torch.inference_mode()
def layerwise_statistics(
    model: nn.Module, ids: torch.Tensor, rank_bound: int, batch_size: int = 8, chunk_tokens: int = 4096
) -> dict[int, dict[str, torch.Tensor | None]]:
    """Per MoE layer, the inputs of ``ops.subset_loss`` for ``ids`` [N, L] with ``rank_bound`` ranks.

    Every block's forward is replaced by the pruning pipeline's recorder, which returns the
    unpruned block output, so each layer sees the unpruned model's inputs (layer-wise mode);
    a calibration batch of ``batch_size`` sequences is one group of the paper's objective.
    """
    adapter = get_adapter(model)
    base = adapter.base_model(model)
    recorders, stats = {}, {}
    for ref in adapter.moe_blocks(model):
        stats[ref.layer] = LayerStats(rank_bound=rank_bound)
        recorders[ref.layer] = StatsForward(adapter, ref.block, rank_bound, stats[ref.layer], chunk_tokens)
        ref.block.forward = recorders[ref.layer]
    try:
        for group, batch in enumerate(ids.split(batch_size)):
            for rec in recorders.values():
                rec.group_id = group
            base(input_ids=batch, use_cache=False)
    finally:
        for ref in adapter.moe_blocks(model):
            del ref.block.forward
    return {layer: st.finish() | {"num_groups": st.num_groups} for layer, st in stats.items()}


def criteria_scores(tensors: dict, num_experts: int, top_k: int) -> dict[str, list[float]]:
    """{frequency, reap, ean: per-expert scores} of one layer from its statistics."""
    m = tensors["ids"].shape[1]
    norms = gram_diagonal(tensors["gram"], m, top_k).clamp_min(0).sqrt()
    counts, reap, ean = layer_scores_from_ranked(
        tensors["ids"][:, :top_k], tensors["target_weights"][:, :top_k], norms, num_experts
    )
    return {"frequency": counts.tolist(), "reap": reap.tolist(), "ean": ean.tolist()}


def reconstruction_kept(
    tensors: dict, num_experts: int, top_k: int, renormalize: bool, num_keep: int, search: str,
    objective: str = "paper", beam_width: int = 4, routing: RoutingSpec | None = None,
) -> list[int]:
    """The experts kept by the reconstruction-loss search at ``num_keep`` on one layer's statistics
    (``routing``: the layer's RoutingSpec; None routes by softmax)."""
    score = make_scorer(
        {k: v for k, v in tensors.items() if k != "num_groups"}, num_experts, top_k, renormalize, objective,
        int(tensors["num_groups"]), routing=routing,
    )
    dropped, _ = run_search(search, score, num_experts, num_experts - num_keep, beam_width)
    return [e for e in range(num_experts) if e not in dropped]


def refuse_grouped_one_pass(adapter) -> None:
    """The one pass keeps rank-bounded statistics (the first k + dropped ranks of every token), which
    do not decide a grouped router's candidates (their experts follow group scores over the kept
    experts); ``moe_fast.prune`` searches grouped routers with its own grouped search instead."""
    spec = grouped_routing(adapter)
    if spec is not None:
        raise ValueError(
            f"the demo's one-pass selections do not serve {adapter.family}'s grouped router (n_group = {spec.n_group}, "
            f"topk_group = {spec.topk_group}): its rank-bounded statistics cannot score grouped candidates; "
            "prune such a model with `moe-fast prune` (grouped search)"
        )


def one_pass_selections(
    model: nn.Module, ids: torch.Tensor, num_keeps: tuple[int, ...], criteria: tuple[str, ...],
    searches: tuple[str, ...], calib: str, seed: int, batch_size: int = 8, beam_width: int = 4,
) -> list[Selection]:
    """Reconstruction (each search) and every statistic criterion at every r, from one pass."""
    adapter = get_adapter(model)
    refuse_grouped_one_pass(adapter)  # before any work, not in the middle
    E, k = adapter.num_experts, adapter.top_k
    routing = {ref.layer: layer_routing(adapter, ref.block) for ref in adapter.moe_blocks(model)}
    rank_bound = min(E, k + E - min(num_keeps))
    per_layer = layerwise_statistics(model, ids, rank_bound, batch_size)
    scores = {layer: criteria_scores(t, E, k) for layer, t in per_layer.items()}
    out = []
    for num_keep in num_keeps:
        for search in searches:
            kept = {
                layer: reconstruction_kept(t, E, k, adapter.renormalize, num_keep, search, beam_width=beam_width,
                                           routing=routing[layer])
                for layer, t in per_layer.items()
            }
            name = "layer-wise" if search == "exhaustive" else search
            out.append(Selection(name, num_keep, calib, seed, _freeze(kept)))
        for criterion in criteria:
            kept = {layer: top_scores(s[criterion], num_keep) for layer, s in scores.items()}
            out.append(Selection(criterion, num_keep, calib, seed, _freeze(kept)))
    return out


def progressive_selection(model_path: str, ids: torch.Tensor, num_keep: int, calib: str, seed: int, batch_size: int = 8) -> Selection:
    """Progressive reconstruction-loss pruning (``moe_fast.prune``) in float32, no checkpoint."""
    from moe_fast.pruning import prune

    result = prune(
        model_path, ids, num_keep, mode="progressive", batch_size=batch_size, dtype="float32", return_model=False,
        progress=False,
    )
    return Selection("progressive", num_keep, calib, seed, _freeze(result.report.kept))


def random_selection(layers: list[int], num_experts: int, num_keep: int, seed: int) -> Selection:
    rng = random.Random(seed)
    return Selection("random", num_keep, None, seed, _freeze({layer: select_random(num_experts, num_keep, rng) for layer in layers}))


def expert_flops_per_token(config, experts_per_token: float, num_moe_layers: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the routed experts for one token, summed over MoE layers."""
    hidden = int(config.hidden_size)
    inter = int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
    return 2.0 * 3 * hidden * inter * experts_per_token * num_moe_layers


def combinations_note(num_experts: int, num_keep: int) -> str:
    return f"C({num_experts},{num_keep}) = {math.comb(num_experts, num_keep)}"
