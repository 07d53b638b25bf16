"""One MoE layer's routing as pruning and masked forwards use it: the spec, ranked ids, target weights.

Why here: the rank-bounded statistics (``pruning.expert_outputs``), the block recorder and
``masked_forward`` must rank and weigh a layer's tokens exactly as ``ops.subset_loss_spec`` checks
and the pruned checkpoint routes (docs/ROUTING.md). Plain softmax routers keep the long-standing
``ops.route`` path bit for bit; every other spec ranks with ``reference.rank_spec`` (the ranking
the subset_loss check recomputes with the same torch ops, so near-ties never disagree).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_fast import ops, reference
from moe_fast.adapters import MoEAdapter
from moe_fast.routing_spec import RoutingSpec, softmax_routing


def layer_routing(adapter: MoEAdapter, block: nn.Module | None = None) -> RoutingSpec:
    """The layer's RoutingSpec (with its selection bias); stand-in adapters without ``routing``
    route by softmax over their ``top_k`` and ``renormalize``."""
    if hasattr(adapter, "routing"):
        return adapter.routing(block)
    return softmax_routing(adapter.top_k, adapter.renormalize)


def ranked_ids(logits: torch.Tensor, m: int, spec: RoutingSpec) -> torch.Tensor:
    """Each token's m best experts in ``spec``'s order, [T, m] int32: what ``ops.subset_loss_spec`` accepts.

    Plain softmax: the fused ``ops.route`` up to its top-k limit (8), the plain-torch ranking (same
    rules) beyond. Other specs: ``reference.rank_spec`` (the op's check ranks the same way).
    """
    if spec.is_plain_softmax:
        if m <= 8:
            return ops.route(logits, m).ids
        order, _ = reference.rank_experts(logits)
        return order[:, :m].to(torch.int32).contiguous()
    if spec.grouped:
        raise ValueError("ranked_ids: a grouped router's candidates are not prefixes of a ranked row")
    return reference.rank_spec(logits, spec)[:, :m].to(torch.int32).contiguous()


def unpruned_weights(logits: torch.Tensor, ranked: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The unpruned final weights [T, k] float32 of the first k slots of ``ranked`` (scaling included).

    Plain softmax: ``ops.route``'s weights, as before. Other specs: the weights of exactly the ranked
    ids (``reference.subset_weights_spec`` keeping every expert), so slots and weights cannot part.
    """
    k = spec.top_k
    if spec.is_plain_softmax:
        return ops.route(logits, k, spec.renormalize).weights
    keep_all = torch.ones(1, logits.shape[1], dtype=torch.bool, device=logits.device)
    w = reference.subset_weights_spec(ranked, logits, keep_all, spec)[0, :, :k]
    return w.float().contiguous()


def route_masked(
    logits: torch.Tensor, spec: RoutingSpec, beta=None, keep: torch.Tensor | None = None
) -> ops.RouteResult:
    """A pruned layer's routing: ``ops.route`` for plain softmax (as before), ``ops.route_spec`` otherwise."""
    if spec.is_plain_softmax:
        return ops.route(logits, spec.top_k, spec.renormalize, beta=beta, keep=keep)
    return ops.route_spec(logits, spec, beta, keep)
