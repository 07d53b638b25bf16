"""One MoE layer's routing as pruning and masked forwards use it: the spec, ranked ids, target weights.

Why here: the rank-bounded statistics (``pruning.expert_outputs``), the block recorder and
``masked_forward`` must rank and weigh a layer's tokens exactly as ``ops.subset_loss_spec`` checks
and the pruned checkpoint routes (docs/ROUTING.md). Plain softmax routers keep the long-standing
``ops.route`` path bit for bit; every other spec ranks with ``routing_runtime.rank_spec`` (the ranking
the subset_loss check recomputes with the same torch ops, so near-ties never disagree).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_fast.kernels import ops
from moe_fast.routing import runtime as routing_runtime
from moe_fast.adapters import MoEAdapter
from moe_fast.kernels.routing_spec import RoutingSpec, softmax_routing


def layer_routing(adapter: MoEAdapter, block: nn.Module | None = None) -> RoutingSpec:
    """The layer's RoutingSpec (with its selection bias); stand-in adapters without ``routing``
    route by softmax over their ``top_k`` and ``renormalize``."""
    if hasattr(adapter, "routing"):
        return adapter.routing(block)
    return softmax_routing(adapter.top_k, adapter.renormalize)


def ranked_ids(logits: torch.Tensor, m: int, spec: RoutingSpec) -> torch.Tensor:
    """Each token's m best experts in ``spec``'s order, [T, m] int32: what ``ops.subset_loss_spec`` accepts.

    Plain softmax: the fused ``ops.route`` up to its top-k limit (8), the plain-torch ranking (same
    rules) beyond. Other specs: ``routing_runtime.rank_spec`` (the op's check ranks the same way).
    """
    if spec.is_plain_softmax:
        if m <= 8:
            return ops.route(logits, m).ids
        order, _ = routing_runtime.rank_experts(logits)
        return order[:, :m].to(torch.int32).contiguous()
    if spec.grouped:
        raise ValueError("ranked_ids: a grouped router's candidates are not prefixes of a ranked row")
    return routing_runtime.rank_spec(logits, spec)[:, :m].to(torch.int32).contiguous()


def unpruned_weights(logits: torch.Tensor, ranked: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The unpruned final weights [T, k] float32 of the first k slots of ``ranked`` (scaling included).

    Plain softmax: ``ops.route``'s weights, as before. Other specs: the weights of exactly the ranked
    ids (``routing_runtime.subset_weights_spec`` keeping every expert), so slots and weights cannot part.
    """
    k = spec.top_k
    if spec.is_plain_softmax:
        return ops.route(logits, k, spec.renormalize).weights
    if spec.grouped:  # the grouped recorder's ranked ids are the unpruned top-k themselves
        keep_all = torch.ones(1, logits.shape[1], dtype=torch.bool, device=logits.device)
        ids, w = route_candidates(logits, spec, keep_all)
        if not torch.equal(ids[0], ranked[:, :k].long().to(ids.device)):
            raise ValueError("unpruned_weights: a grouped router's ranked ids must be its unpruned top-k (route_candidates)")
        return w[0].contiguous()
    keep_all = torch.ones(1, logits.shape[1], dtype=torch.bool, device=logits.device)
    w = routing_runtime.subset_weights_spec(ranked, logits, keep_all, spec)[0, :, :k]
    return w.float().contiguous()


def route_masked(
    logits: torch.Tensor, spec: RoutingSpec, beta=None, keep: torch.Tensor | None = None
) -> ops.RouteResult:
    """A pruned layer's routing: ``ops.route`` for plain softmax (as before), ``ops.route_spec`` otherwise."""
    if spec.is_plain_softmax:
        return ops.route(logits, spec.top_k, spec.renormalize, beta=beta, keep=keep)
    return ops.route_spec(logits, spec, beta, keep)


def route_candidates(
    logits: torch.Tensor, spec: RoutingSpec, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every candidate's routing of every token, vectorized over candidates: keep [C, E] bool ->
    (ids [C, T, k] int64, weights [C, T, k] float32), equal to ``reference.route_spec(logits, spec,
    keep_mask=keep[c])`` without skipping.

    Why: a grouped router's candidates are not prefixes of one ranked row (group scores follow the
    kept experts), so the grouped pruning search routes each candidate afresh. Sigmoid scoring only.
    Each candidate's eligible groups must hold at least k kept experts (equal-per-group keep sets
    with ``topk_group * per_group >= k`` do, and so does every step of the balanced elimination).
    """
    if spec.scoring != "sigmoid":
        raise ValueError(f"route_candidates: sigmoid scoring only, got {spec.scoring!r}")
    C, (T, E), k = keep.shape[0], logits.shape, spec.top_k
    scores, choice = routing_runtime.sigmoid_choice(logits, spec)  # [T, E] float32
    allowed = keep.to(device=logits.device, dtype=torch.bool).unsqueeze(1).expand(C, T, E)
    biased = choice.unsqueeze(0).expand(C, T, E)
    if spec.n_group > 1:
        eligible = routing_runtime.eligible_experts(biased.reshape(C * T, E), allowed.reshape(C * T, E), spec).view(C, T, E)
    else:
        eligible = allowed
    if T and bool((eligible.sum(-1) < k).any()):
        raise ValueError(
            f"route_candidates: a keep set leaves fewer than top-k = {k} experts in the eligible groups "
            f"(n_group = {spec.n_group}, topk_group = {spec.topk_group})"
        )
    order = torch.sort(biased.masked_fill(~eligible, -math.inf), dim=-1, descending=True, stable=True).indices
    ids = order[..., :k]
    top = torch.gather(scores.unsqueeze(0).expand(C, T, E), -1, ids)
    w = top / (top.sum(-1, keepdim=True) + 1e-20) if spec.renormalize else top
    if spec.scaling != 1.0:
        w = w * spec.scaling
    return ids, w.float()
