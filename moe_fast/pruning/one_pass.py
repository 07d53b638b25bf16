"""Every r's reconstruction selection and every statistic criterion's, from one layer-wise pass.

Why one pass: with the rank bound of the smallest r, each token's ranked expert outputs, their
Gram entries and the unpruned routing weights are everything the reconstruction search needs for
every larger r as well, and the top-k slots among them give the frequency counts and the
activation norms (the Gram diagonal) that ``reap`` and ``ean`` need. Layer-wise inputs do not
depend on r, so one pass of the calibration tokens through the model serves a whole comparison
table (the demo's). It streams like ``moe_fast.prune`` and collects and chooses with the same
strategy objects (``strategies.reconstruction.BoundedReconstruction``); the model is not changed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moe_fast.pruning.calibration_batches import CalibrationBatches
from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.hidden_states import HiddenStates
from moe_fast.pruning.layer_phases import open_layer
from moe_fast.pruning.settings import SearchSpec, grouped_routing
from moe_fast.pruning.source import LoadedSource
from moe_fast.pruning.strategies.criteria import layer_scores_from_ranked, top_scores
from moe_fast.pruning.strategies.reconstruction import BoundedReconstruction, RunShape

Kept = dict[int, list[int]]  # {MoE layer: kept experts}


def gram_diagonal(gram: torch.Tensor, m: int, slots: int) -> torch.Tensor:
    """[T, slots] squared output norms of the first ``slots`` ranks from packed Gram rows [T, m(m+1)/2]."""
    index = [j * m - j * (j - 1) // 2 for j in range(slots)]  # (j, j) in the row-by-row upper triangle
    return gram[:, index]


def criteria_scores(collected: dict, num_experts: int, top_k: int) -> dict[str, list[float]]:
    """{frequency, reap, ean: per-expert scores} of one layer from its rank-bounded statistics."""
    m = collected["ids"].shape[1]
    norms = gram_diagonal(collected["gram"], m, top_k).clamp_min(0).sqrt()
    counts, reap, ean = layer_scores_from_ranked(
        collected["ids"][:, :top_k], collected["target_weights"][:, :top_k], norms, num_experts
    )
    return {"frequency": counts.tolist(), "reap": reap.tolist(), "ean": ean.tolist()}


def refuse_grouped(adapter) -> None:
    """Rank-bounded statistics (the first k + dropped ranks of every token) do not decide a grouped
    router's candidates (their experts follow group scores over the kept experts);
    ``moe_fast.prune`` searches grouped routers with its own grouped search instead."""
    spec = grouped_routing(adapter)
    if spec is not None:
        raise ValueError(
            f"the one-pass selections do not serve {adapter.family}'s grouped router (n_group = {spec.n_group}, "
            f"topk_group = {spec.topk_group}): its rank-bounded statistics cannot score grouped candidates; "
            "prune such a model with `moe-fast prune` (grouped search)"
        )


@torch.inference_mode()
def one_pass_selections(
    model: nn.Module, ids: torch.Tensor, num_keeps: tuple[int, ...], criteria: tuple[str, ...],
    searches: tuple[str, ...], batch_size: int = 8, beam_width: int = 4, chunk_tokens: int = 4096,
) -> dict[tuple[str, int], Kept]:
    """{(method, r): kept experts per layer} for every search in ``searches`` (``exhaustive``,
    ``greedy``, ``beam``) and every criterion in ``criteria`` (``frequency``, ``reap``, ``ean``) at
    every r in ``num_keeps``, from one layer-wise pass of ``ids`` [N, L] (a batch of ``batch_size``
    sequences is one term of the paper's objective)."""
    source = LoadedSource(model)
    adapter = source.adapter
    refuse_grouped(adapter)  # before any work, not in the middle
    E, k = adapter.num_experts, adapter.top_k
    calib = CalibrationBatches(ids, batch_size, {})
    shape = RunShape(calib.num_batches, calib.num_tokens, chunk_tokens)
    base = SearchSpec(E, k, min(num_keeps), "exhaustive", beam_width, "paper", lazy=False)
    collector = BoundedReconstruction(adapter, base, Dist(), shape)
    choosers = {(search, r): BoundedReconstruction(adapter, dataclasses.replace(base, num_keep=r, method=search), Dist(), shape)
                for r in num_keeps for search in searches}
    out: dict[tuple[str, int], Kept] = {key: {} for key in [*choosers, *((c, r) for r in num_keeps for c in criteria)]}
    stream = HiddenStates(source, calib, list(range(calib.num_batches)), progressive=False)
    for index in range(source.num_layers):
        with open_layer(source, index, Dist()) as (layer, block):
            if block is None:
                stream.forward_unpruned(layer)
                continue
            collected = collector.collect(stream, layer, block)
        for key, chooser in choosers.items():
            out[key][index] = chooser.choose(chooser.score(collected, block), index).kept
        scores = criteria_scores(collected, E, k)
        for criterion in criteria:
            for r in num_keeps:
                out[criterion, r][index] = top_scores(scores[criterion], r)
    return out
