"""Plain-torch routing pieces the library runs: ranking, masked weights, skip ratios, the dispatch plan.

Why a module apart from :mod:`moe_fast.reference`: that module is the specification the tests
check the kernels against; library code (patching, skipping calibration, a layer's routing, the
pruning search) takes what it runs from here, so the spec can be read, and changed to say
something, without moving the library. The rules are the spec's (ranking largest first with
ties to the lower index, NaN as -inf, +inf as float32 max, sigmoid groups, the skip log-ratio),
written with the same torch operations: ``ops.subset_loss_spec`` and the spec recompute the
ranking, and a near-tie must fall the same way. tests/routing/test_routing_runtime.py checks that every
function here equals its namesake in ``moe_fast.reference`` exactly.
"""

from __future__ import annotations

import math

import torch

from moe_fast.kernels.routing_spec import RoutingSpec

__all__ = [
    "sanitize_logits", "rank_experts", "sigmoid_choice", "eligible_experts", "rank_spec",
    "skip_ratios", "subset_weights_spec", "dispatch_plan", "triu_pairs",
]

_F32_MAX = torch.finfo(torch.float32).max


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 copy with NaN -> -inf and +inf -> float32 max (the kernels read logits so)."""
    x = logits.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)
    return torch.where(x == math.inf, torch.full_like(x, _F32_MAX), x)


def _allowed(like: torch.Tensor, keep_mask: torch.Tensor | None) -> torch.Tensor:
    if keep_mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    return keep_mask.to(like.device).bool().expand_as(like)


def rank_experts(logits: torch.Tensor, keep_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert of each row in softmax routing order -> (order [T, E] int64, ranking logits [T, E]).

    Allowed experts first, largest logit first, ties to the lower index; masked ones last. A row
    with no finite allowed logit ranks its allowed experts as equals (0), by index.
    """
    lg = sanitize_logits(logits)
    allowed = _allowed(lg, keep_mask)
    best = lg.masked_fill(~allowed, -math.inf).amax(dim=-1, keepdim=True) if lg.shape[-1] else lg
    lg = torch.where((best == -math.inf) & allowed, torch.zeros_like(lg), lg)
    order = torch.sort(lg, dim=-1, descending=True, stable=True).indices
    allowed_first = torch.sort(torch.gather(allowed, -1, order).to(torch.int8), dim=-1, descending=True, stable=True).indices
    return torch.gather(order, -1, allowed_first), lg.masked_fill(~allowed, -math.inf)


def sigmoid_choice(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmoid scores [T, E], the biased scores experts are chosen by [T, E]), both float32."""
    scores = torch.sigmoid(sanitize_logits(logits))
    bias = spec.selection_bias
    if bias is None:
        return scores, scores
    if bias.shape != (logits.shape[-1],):
        raise ValueError(f"route_spec: selection_bias has shape {tuple(bias.shape)}, expected [{logits.shape[-1]}]")
    bias = bias.to(device=scores.device, dtype=torch.float32)
    if not torch.isfinite(bias).all():
        raise ValueError("route_spec: selection_bias must be finite")
    return scores, scores + bias


def eligible_experts(choice: torch.Tensor, allowed: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """[T, E] bool: the allowed experts of each token's ``topk_group`` best groups.

    A group scores the sum of its two best allowed biased scores (its one allowed score when only
    one is, -inf when none is); ties go to the lower group.
    """
    T, E = choice.shape
    G = spec.n_group
    if E % G:
        raise ValueError(f"route_spec: {E} experts do not split into n_group = {G} equal groups")
    size = E // G
    best = torch.topk(choice.masked_fill(~allowed, -math.inf).view(T, G, size), min(2, size), dim=-1).values
    score = best[..., 0]
    if size >= 2:
        second = best[..., 1]
        score = score + torch.where(second == -math.inf, torch.zeros_like(second), second)
    top_groups = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, : spec.topk_group]
    chosen = torch.zeros(T, G, dtype=torch.bool, device=choice.device).scatter_(1, top_groups, True)
    return chosen.repeat_interleave(size, dim=1) & allowed


def rank_spec(logits: torch.Tensor, spec: RoutingSpec, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Every expert of each row in ``spec``'s routing order, [T, E] int64.

    Softmax scorings: :func:`rank_experts`. Sigmoid: allowed experts of the eligible groups by
    biased score, then the other allowed experts by index, then masked ones by index.
    """
    if spec.scoring != "sigmoid":
        return rank_experts(logits, keep_mask)[0]
    _, choice = sigmoid_choice(logits, spec)
    allowed = _allowed(choice, keep_mask)
    tier = torch.where(allowed, 1, 2).to(torch.int8)
    first = eligible_experts(choice, allowed, spec) if spec.n_group > 1 else allowed
    tier = torch.where(first, torch.zeros_like(tier), tier)
    order = torch.sort(choice.masked_fill(tier != 0, -math.inf), dim=-1, descending=True, stable=True).indices
    return torch.gather(order, -1, torch.sort(torch.gather(tier, -1, order), dim=-1, stable=True).indices)


def _top_log_weights(logits: torch.Tensor, spec: RoutingSpec, keep_mask: torch.Tensor | None) -> torch.Tensor:
    """[T, k] float64: log of the k chosen experts' weights up to a per-row constant (the skip rule's terms)."""
    k = spec.top_k
    if spec.scoring == "sigmoid":
        idx = rank_spec(logits, spec, keep_mask)[:, :k]
        scores, _ = sigmoid_choice(logits, spec)
        return torch.log(torch.gather(scores, -1, idx).double())
    order, lg = rank_experts(logits, keep_mask)
    return torch.gather(lg, -1, order[:, :k]).double()


def skip_ratios(logits: torch.Tensor, spec: RoutingSpec, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """w_j / w_0 before skipping for slots j = 1..k-1, [T, k-1] float64: what calibration takes
    the quantile of (slot j is skipped for beta_j above it)."""
    log_top = _top_log_weights(logits, spec, keep_mask)
    return torch.exp(log_top[:, 1:] - log_top[:, :1])


def _check_not_grouped(spec: RoutingSpec) -> None:
    if spec.grouped:
        raise ValueError(
            f"moe_fast.subset_loss: grouped routing (n_group = {spec.n_group}, topk_group = {spec.topk_group}) "
            "is not supported: a candidate's experts then depend on group scores, not on a prefix of the ranked list"
        )


def _candidate_slots(ids: torch.Tensor, keep_mask: torch.Tensor, k: int) -> torch.Tensor:
    kept = keep_mask.bool()[:, ids.long()]  # [C, T, M]
    return kept & (torch.cumsum(kept.to(torch.int64), dim=-1) <= k)


def _softmax_subset_weights(
    ids: torch.Tensor, logits: torch.Tensor, keep_mask: torch.Tensor, k: int, renormalize: bool
) -> torch.Tensor:
    lg = sanitize_logits(logits).double()
    sel = _candidate_slots(ids, keep_mask, k)
    ranked = torch.gather(lg, 1, ids.long()).unsqueeze(0).expand_as(sel)
    first = torch.argmax(sel.to(torch.int8), dim=-1, keepdim=True)
    l0 = torch.gather(ranked, -1, first)
    degenerate = l0 == -math.inf
    rel = torch.exp(torch.where(degenerate, torch.zeros_like(ranked), ranked - l0))
    rel = torch.where(sel, rel, torch.zeros_like(rel))
    if renormalize:
        return rel / rel.sum(-1, keepdim=True)
    allowed = keep_mask.bool().unsqueeze(1)
    l0_all = torch.where(degenerate, torch.zeros_like(l0), l0)
    terms = torch.where(degenerate, torch.ones_like(lg), torch.exp(lg.unsqueeze(0) - l0_all))
    return rel / torch.where(allowed, terms, torch.zeros_like(terms)).sum(-1, keepdim=True)


def subset_weights_spec(
    ids: torch.Tensor, logits: torch.Tensor, keep_mask: torch.Tensor, spec: RoutingSpec
) -> torch.Tensor:
    """Each candidate's final weights over each token's ranked slots, [C, T, M] float64.

    ids [T, M] ranked by ``spec``, keep_mask [C, E] bool. A candidate routes a token to the first k
    experts it keeps of the ranked row (exact without groups), weighted as ``spec`` weighs them.
    """
    _check_not_grouped(spec)
    k = spec.top_k
    if spec.scoring == "sigmoid":
        sel = _candidate_slots(ids, keep_mask, k)
        scores = torch.gather(torch.sigmoid(sanitize_logits(logits)), 1, ids.long()).double()
        w = torch.where(sel, scores.unsqueeze(0), torch.zeros_like(sel, dtype=torch.float64))
        if spec.renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    else:
        w = _softmax_subset_weights(ids, logits, keep_mask, k, spec.renormalize or spec.scoring == "softmax_topk")
    return w * spec.scaling if spec.scaling != 1.0 else w


def dispatch_plan(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] (E = skipped) -> counts [E], offsets [E + 1], perm [T * k] (int32): perm lists
    the flat slots ``t * k + j`` grouped by expert (tokens ascending), skipped last."""
    flat = ids.reshape(-1).long()
    perm = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    return counts, offsets, perm


def triu_pairs(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) with i <= j in the Gram packing order of ``ops.expert_gram``: the upper triangle row by row."""
    rows, cols = torch.triu_indices(m, m)
    return rows, cols
