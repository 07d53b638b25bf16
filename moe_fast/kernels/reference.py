"""Plain PyTorch references: the specification of every moe_fast op.

Slow but obviously correct (vectorized, no custom code paths); the kernels are tested against
these. No library module imports it (tests/test_imports.py): the plain-torch routing the library
runs is :mod:`moe_fast.routing.runtime`, checked equal to this one (tests/routing/test_routing_runtime.py).
This module is the specification: routing, skipping and the subset losses are defined here:

* ``route`` is not differentiable: its weights come back detached (``requires_grad=False``);
  the same holds for ``expert_gram`` and ``subset_loss``. They serve inference and the pruning
  search, which need no gradient.
* Logits are read as float32. NaN counts as -inf (it never wins); +inf counts as the largest
  finite float32. Experts outside ``keep`` act as -inf and are never chosen.
* Ranking is by logit (equivalently by softmax probability), largest first, ties to the lower
  expert index.
* A row whose allowed logits are all -inf (or NaN) is taken as all-equal logits: the k lowest
  allowed expert indices, equal weights.
* Skipping: slot j >= 1 is skipped when ``float64(l_0) - float64(l_j) > -log(beta_j)`` (that is,
  ``w_j < beta_j * w_0``; ties do not skip, beta = 0 never skips). A skipped slot has id E and
  weight 0. With ``renormalize`` the other slots sum to 1; without it they keep their softmax
  probabilities scaled so that they still sum to what the top-k summed before skipping.

``route_spec`` generalizes ``route`` to any router described by a
:class:`~moe_fast.kernels.routing_spec.RoutingSpec` (docs/ROUTING.md); for a softmax spec it is ``route``:

* ``sigmoid`` scoring: scores ``s = sigmoid(l)`` (float32, of the sanitized logits, so NaN scores 0
  and +inf scores 1); experts are chosen by ``s + selection_bias`` (float32), ties to the lower
  index. With groups, experts ``g * E/n_group ..`` form group g; a group's score is the float32 sum
  of its two best allowed biased scores (its one allowed score when only one is allowed, -inf
  when none is); the ``topk_group`` best groups are eligible, ties to the lower group. Routing
  order: allowed experts of eligible groups by biased score, then the other allowed experts by
  index, then masked ones by index. The second tier is transformers' rule when the eligible groups
  hold fewer than k experts (its router masks the other groups' scores with -inf and still takes
  the top k over all experts, so those fill the remaining slots as equals; ties go to the lower
  index). Weights are the unbiased ``s`` of the chosen experts (fill-in slots included, as
  transformers gathers them), divided by ``sum + 1e-20`` with ``renormalize`` (as transformers
  does), times ``scaling``.
* ``softmax_topk`` scoring: chosen as by ``route`` (by logit); weights are the softmax of the k
  chosen logits only, times ``scaling``.
* Skipping for any scoring: slot j >= 1 is skipped when ``w_j < beta_j * w_0`` on the final
  weights, decided in float64 as ``log w_0 - log w_j > -log(beta_j)`` where the log-ratio is taken
  from what the weights are proportional to: the logits for the softmax scorings (exactly the rule
  above), ``log s`` of the float32 scores for sigmoid. The surviving weights are scaled so that
  they sum to what the k final weights summed before skipping. ``skip_ratios`` gives
  ``w_j / w_0 = exp(-(log w_0 - log w_j))`` for calibration.

``subset_loss_spec`` generalizes ``subset_loss`` to any spec without groups: ids are ranked by
``rank_spec``, a candidate routes a token to the first k kept experts of its ranked row, and the
weights are ``route_spec``'s with the other experts masked (``subset_weights_spec``).

``grouped_subset_loss`` is the pruning objective of a grouped router (``topk_group < n_group``),
where a candidate's experts depend on the group scores over the experts it keeps: every token is
routed by ``route_spec`` with the candidate's mask, its output is the weighted sum of the chosen
experts' outputs, and the squared distance (float64) to the target (default: the unpruned routed
output) is summed per calibration batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from moe_fast.kernels.beta_args import beta_values, per_slot  # what a beta may be is read in one place
from moe_fast.kernels.ops import RouteResult  # the op's result type, which the spec of the op returns
from moe_fast.kernels.routing_spec import RoutingSpec, softmax_routing

_F32_MAX = torch.finfo(torch.float32).max


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 copy with NaN -> -inf and +inf -> float32 max."""
    x = logits.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)
    return torch.where(x == math.inf, torch.full_like(x, _F32_MAX), x)


def skip_gaps(beta: float | Sequence[float] | torch.Tensor | None, k: int) -> list[float] | None:
    """Per-slot logit gaps -log(beta_j) (slot 0 unused); None when nothing skips."""
    values = beta_values(beta)
    if values is None:
        return None
    gaps = [math.inf]
    for b in per_slot(values, k)[: k - 1]:
        gaps.append(math.inf if b == 0.0 else -math.log(b))
    return gaps


def rank_experts(logits: torch.Tensor, keep_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts of every row in routing order -> (order [T, E] int64, ranking logits [T, E]).

    Allowed experts come first (largest logit first, ties to the lower index); masked ones last.
    The returned logits are sanitized, with degenerate rows set to 0 on allowed experts.
    """
    lg = sanitize_logits(logits)
    allowed = torch.ones_like(lg, dtype=torch.bool) if keep_mask is None else keep_mask.to(lg.device).bool().expand_as(lg)
    best = lg.masked_fill(~allowed, -math.inf).amax(dim=-1, keepdim=True) if lg.shape[-1] else lg
    degenerate = best == -math.inf
    lg = torch.where(degenerate & allowed, torch.zeros_like(lg), lg)
    order = torch.sort(lg, dim=-1, descending=True, stable=True).indices
    allowed_sorted = torch.gather(allowed, -1, order).to(torch.int8)
    order = torch.gather(order, -1, torch.sort(allowed_sorted, dim=-1, descending=True, stable=True).indices)
    return order, lg.masked_fill(~allowed, -math.inf)


def route(
    logits: torch.Tensor,
    k: int,
    renormalize: bool = True,
    beta: float | Sequence[float] | None = None,
    keep: torch.Tensor | None = None,
) -> RouteResult:
    """Reference of ``moe_fast.ops.route``: logits [T, E] -> RouteResult (a softmax ``route_spec``)."""
    return route_spec(logits, softmax_routing(k, renormalize), beta, keep)


def sigmoid_choice(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores [T, E] and the biased scores experts are chosen by [T, E] (both float32)."""
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
    """[T, E] bool: the experts of each token's ``topk_group`` best groups (masked ones excluded)."""
    T, E = choice.shape
    G = spec.n_group
    if E % G:
        raise ValueError(f"route_spec: {E} experts do not split into n_group = {G} equal groups")
    size = E // G
    grouped = choice.masked_fill(~allowed, -math.inf).view(T, G, size)
    best = torch.topk(grouped, min(2, size), dim=-1).values  # [T, G, <=2], largest first
    score = best[..., 0]
    if size >= 2:  # a lone allowed expert scores alone (its masked partner counts 0)
        second = best[..., 1]
        score = score + torch.where(second == -math.inf, torch.zeros_like(second), second)
    top_groups = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, : spec.topk_group]
    chosen = torch.zeros(T, G, dtype=torch.bool, device=choice.device).scatter_(1, top_groups, True)
    return chosen.repeat_interleave(size, dim=1) & allowed


def rank_spec(logits: torch.Tensor, spec: RoutingSpec, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """All experts of every row in ``spec``'s routing order: order [T, E] int64.

    Softmax scorings rank as ``rank_experts``. Sigmoid: allowed experts of eligible groups first,
    by biased score (ties to the lower index); then the other allowed experts, by index (their
    scores count as -inf, as transformers masks them); then masked ones, by index.
    """
    if spec.scoring != "sigmoid":
        return rank_experts(logits, keep_mask)[0]
    _, choice = sigmoid_choice(logits, spec)
    allowed = torch.ones_like(choice, dtype=torch.bool) if keep_mask is None else keep_mask.to(choice.device).bool().expand_as(choice)
    tier = torch.where(allowed, 1, 2).to(torch.int8)
    if spec.n_group > 1:
        tier = torch.where(eligible_experts(choice, allowed, spec), torch.zeros_like(tier), tier)
    else:
        tier = torch.where(allowed, torch.zeros_like(tier), tier)
    # Only the first tier ranks by score; the others are -inf alike and keep index order (stable).
    order = torch.sort(choice.masked_fill(tier != 0, -math.inf), dim=-1, descending=True, stable=True).indices
    tiers = torch.gather(tier, -1, order)
    return torch.gather(order, -1, torch.sort(tiers, dim=-1, stable=True).indices)


def top_scores(
    logits: torch.Tensor, spec: RoutingSpec, keep_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k chosen experts before skipping -> (ids [T, k] int64, raw weights [T, k] float32,
    log-weights [T, k] float64 up to a per-row constant: what the skip rule compares)."""
    T = logits.shape[0]
    k = spec.top_k
    if spec.scoring == "sigmoid":
        idx = rank_spec(logits, spec, keep_mask)[:, :k]
        scores, _ = sigmoid_choice(logits, spec)
        top = torch.gather(scores, -1, idx)
        return idx, top, torch.log(top.double())
    order, lg = rank_experts(logits, keep_mask)
    idx = order[:, :k]
    top_l = torch.gather(lg, -1, idx)
    if spec.scoring == "softmax":
        probs = torch.softmax(lg, dim=-1) if T else lg
        top = torch.gather(probs, -1, idx)
    else:  # softmax_topk
        top = torch.softmax(top_l, dim=-1) if T else top_l
    return idx, top, top_l.double()


def skipped_slots(log_top: torch.Tensor, beta: float | Sequence[float] | torch.Tensor | None) -> torch.Tensor:
    """[T, k] bool: slot j >= 1 skipped when ``log w_0 - log w_j > -log(beta_j)`` (float64)."""
    k = log_top.shape[-1]
    skipped = torch.zeros_like(log_top, dtype=torch.bool)
    gaps = skip_gaps(beta, k)
    if gaps is not None:
        gap = log_top[:, :1] - log_top
        thr = torch.tensor(gaps[:k], dtype=torch.float64)
        skipped = gap > thr
        skipped[:, 0] = False
    return skipped


def route_spec(
    logits: torch.Tensor,
    spec: RoutingSpec,
    beta: float | Sequence[float] | torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
) -> RouteResult:
    """Routing of any ``spec`` (module docstring): logits [T, E] -> RouteResult.

    ``logits`` are the router's output index 0 (gpt-oss: with its bias; DeepSeek: without the
    selection bias). ``keep_mask`` [E] bool: experts outside it are never chosen (while enough
    are allowed) and do not count in group scores.
    """
    T, E = logits.shape
    idx, top, log_top = top_scores(logits, spec, keep_mask)
    skipped = skipped_slots(log_top, beta)
    kept = top.masked_fill(skipped, 0.0)
    if spec.renormalize:
        total = kept.sum(-1, keepdim=True)
        weights = kept / (total + 1e-20 if spec.scoring == "sigmoid" else total)
    else:  # survivors keep the mass the k weights had before skipping
        rescaled = kept * (top.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
        weights = torch.where(skipped.any(-1, keepdim=True), rescaled, kept)
    if spec.scaling != 1.0:
        weights = weights * spec.scaling
    ids = idx.masked_fill(skipped, E).to(torch.int32)
    return RouteResult(weights.float(), ids, *dispatch_plan(ids, E))


def skip_ratios(logits: torch.Tensor, spec: RoutingSpec, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """w_j / w_0 of the final weights for slots j = 1..k-1, before skipping: [T, k-1] float64.

    What skipping calibration takes the quantile of: slot j is skipped for beta_j above it. The
    ratio is ``exp`` of the log-ratio the skip rule compares, so renormalizing and scaling cancel.
    """
    _, _, log_top = top_scores(logits, spec, keep_mask)
    return torch.exp(log_top[:, 1:] - log_top[:, :1])


def dispatch_plan(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [T, k] (E = skipped) -> counts [E], offsets [E + 1], perm [T * k] (all int32).

    perm lists flat slot indices t * k + j grouped by expert (tokens ascending), skipped last.
    """
    flat = ids.reshape(-1).long()
    perm = torch.sort(flat, stable=True).indices.to(torch.int32)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    return counts, offsets, perm


def triu_pairs(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) with i <= j in the Gram packing order: the upper triangle row by row."""
    rows, cols = torch.triu_indices(m, m)
    return rows, cols


def expert_gram(
    outputs: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``moe_fast.ops.expert_gram``.

    outputs [T, M, H] -> gram [T, M(M+1)/2] (packed upper triangle, row by row),
    cross [T, M] = <y_i, target>, target_sq [T] = ||target||^2 (empty without target); float32.
    """
    T, M, _ = outputs.shape
    y = outputs.float()
    full = torch.bmm(y, y.transpose(1, 2))
    rows, cols = triu_pairs(M)
    gram = full[:, rows, cols]
    if target is None:
        return gram, y.new_empty(T, 0), y.new_empty(0)
    z = target.float()
    return gram, torch.einsum("tmh,th->tm", y, z), (z * z).sum(-1)


def unpack_gram(gram: torch.Tensor, m: int) -> torch.Tensor:
    """[T, M(M+1)/2] -> symmetric [T, M, M] (same dtype)."""
    rows, cols = triu_pairs(m)
    full = gram.new_zeros(gram.shape[0], m, m)
    full[:, rows, cols] = gram
    full[:, cols, rows] = gram
    return full


def ranking_values(logits: torch.Tensor, spec: RoutingSpec | None = None) -> torch.Tensor:
    """What experts are ranked by, [T, E] float32: the sanitized logits for the softmax scorings,
    the biased sigmoid scores (``s + selection_bias``) for sigmoid. Ties go to the lower index."""
    if spec is None or spec.scoring != "sigmoid":
        return sanitize_logits(logits)
    return sigmoid_choice(logits, spec)[1]


def check_subset_spec(spec: RoutingSpec) -> None:
    """subset_loss serves routers whose candidates route by a prefix of the token's ranked list.

    With groups (``topk_group < n_group``) a candidate's choice depends on the group scores of the
    experts it keeps, so it is not "the first k kept experts of the ranked list": refused (the
    pruning search scores grouped routers with ``grouped_subset_loss``'s rule instead).
    """
    if spec.grouped:
        raise ValueError(
            f"moe_fast.subset_loss: grouped routing (n_group = {spec.n_group}, topk_group = {spec.topk_group}) is not "
            "supported yet: a candidate's experts then depend on group scores over the experts it keeps, not only on "
            "a prefix of each token's ranked list"
        )


def check_ranked_ids(ids: torch.Tensor, logits: torch.Tensor, spec: RoutingSpec | None = None) -> None:
    """subset_loss's contract on ``ids``: each row is its token's top M experts in ``spec``'s routing
    order, exactly ``rank_spec(logits, spec)[:, :M]`` (softmax: ``route(logits, M).ids``; so in [0, E),
    no expert twice). Raises ValueError otherwise."""
    T, M = ids.shape
    if T == 0:
        return
    if spec is not None:
        check_subset_spec(spec)
    by_score = spec is not None and spec.scoring == "sigmoid"
    want = (rank_spec(logits, spec) if by_score else rank_experts(logits)[0])[:, :M].to(ids.device)
    bad = (want != ids.long()).any(-1).nonzero()
    if len(bad):
        t = int(bad[0])
        what = "largest biased sigmoid score first" if by_score else "largest logit first"
        raise ValueError(
            f"moe_fast.subset_loss: ids row of token {t} is not ranked: each expert once, {what}, "
            f"ties to the lower index (as {'rank_spec(logits, spec)[:, :M]' if by_score else 'route(logits, M).ids'} "
            f"gives them); got {ids[t].tolist()}, expected {want[t].tolist()}"
        )


def candidate_slots(ids: torch.Tensor, keep_mask: torch.Tensor, k: int) -> torch.Tensor:
    """[C, T, M] bool: each candidate's routed slots, the first k kept experts of each ranked row."""
    kept = keep_mask.bool()[:, ids.long()]  # [C, T, M]
    return kept & (torch.cumsum(kept.to(torch.int64), dim=-1) <= k)


def subset_weights(
    ids: torch.Tensor, logits: torch.Tensor, keep_mask: torch.Tensor, k: int, renormalize: bool = True
) -> torch.Tensor:
    """Routing weights of every candidate over each token's M ranked slots: [C, T, M] float64.

    ids [T, M] ranked experts, logits [T, E], keep_mask [C, E] bool (one row per candidate). Same
    rules as ``route`` with the experts outside the candidate masked.
    """
    lg = sanitize_logits(logits).double()  # [T, E]
    sel = candidate_slots(ids, keep_mask, k)
    ranked = torch.gather(lg, 1, ids.long()).unsqueeze(0).expand_as(sel)  # [C, T, M]
    first = torch.argmax(sel.to(torch.int8), dim=-1, keepdim=True)
    l0 = torch.gather(ranked, -1, first)
    degenerate = l0 == -math.inf
    rel = torch.exp(torch.where(degenerate, torch.zeros_like(ranked), ranked - l0))
    rel = torch.where(sel, rel, torch.zeros_like(rel))
    if renormalize:
        return rel / rel.sum(-1, keepdim=True)
    allowed = keep_mask.bool().unsqueeze(1)  # [C, 1, E]
    l0_all = torch.where(degenerate, torch.zeros_like(l0), l0)
    terms = torch.where(degenerate, torch.ones_like(lg), torch.exp(lg.unsqueeze(0) - l0_all))
    z = torch.where(allowed, terms, torch.zeros_like(terms)).sum(-1, keepdim=True)
    return rel / z


def subset_weights_spec(
    ids: torch.Tensor, logits: torch.Tensor, keep_mask: torch.Tensor, spec: RoutingSpec
) -> torch.Tensor:
    """``subset_weights`` for any non-grouped ``spec``: [C, T, M] float64, ids ranked by ``spec``.

    A candidate routes a token to the first k kept experts of its ranked row (exact without groups:
    masking experts does not reorder the others). Weights: softmax as ``subset_weights``;
    softmax_topk the softmax of the k chosen logits; sigmoid the unbiased float32 scores of the
    chosen k, divided by ``sum + 1e-20`` with ``renormalize``; all times ``scaling``.
    """
    check_subset_spec(spec)
    k = spec.top_k
    if spec.scoring == "sigmoid":
        sel = candidate_slots(ids, keep_mask, k)
        scores = torch.gather(torch.sigmoid(sanitize_logits(logits)), 1, ids.long()).double()  # [T, M]
        w = torch.where(sel, scores.unsqueeze(0), torch.zeros_like(sel, dtype=torch.float64))
        if spec.renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    else:  # softmax over the chosen k logits = renormalized softmax weights
        w = subset_weights(ids, logits, keep_mask, k, spec.renormalize or spec.scoring == "softmax_topk")
    return w * spec.scaling if spec.scaling != 1.0 else w


def subset_loss(
    gram: torch.Tensor,
    ids: torch.Tensor,
    logits: torch.Tensor,
    keep: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    k: int,
    renormalize: bool = True,
    target_weights: torch.Tensor | None = None,
    cross: torch.Tensor | None = None,
    target_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of ``moe_fast.ops.subset_loss``: squared errors [C, G] float64 (see the op);
    :func:`subset_loss_spec` with a softmax spec."""
    return subset_loss_spec(gram, ids, logits, keep, group, num_groups, softmax_routing(k, renormalize),
                            target_weights, cross, target_sq)


def subset_loss_spec(
    gram: torch.Tensor,
    ids: torch.Tensor,
    logits: torch.Tensor,
    keep: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    spec: RoutingSpec,
    target_weights: torch.Tensor | None = None,
    cross: torch.Tensor | None = None,
    target_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference of ``moe_fast.ops.subset_loss_spec``: ``subset_loss`` for a non-grouped ``spec``
    (ids = ``rank_spec(logits, spec)[:, :M]``), [C, G] float64. A softmax spec with scaling 1 is
    ``subset_loss`` bit for bit."""
    check_subset_spec(spec)
    T, M = ids.shape
    C = keep.shape[0]
    check_ranked_ids(ids, logits, spec)
    out = torch.zeros(C, num_groups, dtype=torch.float64)
    if T == 0 or C == 0:
        return out
    w = subset_weights_spec(ids, logits, keep, spec)  # [C, T, M]
    return subset_errors(w, gram, M, group, out, target_weights, cross, target_sq)


def subset_errors(
    w: torch.Tensor,
    gram: torch.Tensor,
    m: int,
    group: torch.Tensor,
    out: torch.Tensor,
    target_weights: torch.Tensor | None,
    cross: torch.Tensor | None,
    target_sq: torch.Tensor | None,
) -> torch.Tensor:
    """Adds each candidate's squared errors [C, T] under weights w [C, T, M] into out [C, G] by group."""
    G = unpack_gram(gram.double(), m)  # [T, M, M]
    if target_weights is not None:
        d = w - target_weights.double().unsqueeze(0)
        err = torch.einsum("ctm,tmn,ctn->ct", d, G, d)
    else:
        err = (
            torch.einsum("ctm,tmn,ctn->ct", w, G, w)
            - 2.0 * torch.einsum("ctm,tm->ct", w, cross.double())
            + target_sq.double().unsqueeze(0)
        )
    return out.index_add_(1, group.long(), err)


def grouped_subset_loss(
    outputs: torch.Tensor,
    logits: torch.Tensor,
    keep: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    spec: RoutingSpec,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared errors [C, G] float64 of keep-sets under any router, grouped ones included.

    outputs [T, E, H]: every expert's output on every token; logits [T, E]; keep [C, E] bool;
    group [T] int64 calibration batch of each token. Candidate c routes token t as
    ``route_spec(logits, spec, keep_mask=keep[c])`` and outputs ``sum_j w_j * outputs[t, id_j]``;
    its error is ``||output - target_t||^2`` in float64, summed over the tokens of each batch.
    ``target`` [T, H] (progressive: the unpruned block output less the shared path); None: the
    unpruned routed output ``route_spec(logits, spec)`` over the same outputs.
    """
    T, E, H = outputs.shape
    y = outputs.double()

    def routed(mask: torch.Tensor | None) -> torch.Tensor:
        r = route_spec(logits, spec, keep_mask=mask)
        ids = r.ids.long()
        chosen = torch.gather(y, 1, ids.unsqueeze(-1).expand(T, ids.shape[1], H))  # [T, k, H]
        return (r.weights.double().unsqueeze(-1) * chosen).sum(1)

    want = routed(None) if target is None else target.double()
    out = torch.zeros(keep.shape[0], num_groups, dtype=torch.float64)
    for c in range(keep.shape[0]):
        err = ((routed(keep[c].bool()) - want) ** 2).sum(-1)
        out[c].index_add_(0, group.long(), err)
    return out


def grouped_row_experts(rows: int, ends: torch.Tensor) -> torch.Tensor:
    """[rows] int64: the expert of each row of a grouped product (E past ``ends[-1]``)."""
    return torch.searchsorted(ends.long().cpu(), torch.arange(rows), right=True).to(ends.device)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Reference of ``torch.ops.moe_fast.grouped_matmul``: x [R, in] (rows grouped by expert),
    weight [E, in, out], ends [E] -> [R, out] in weight's dtype; rows ``ends[e-1]:ends[e]`` times
    ``weight[e]``, rows from ``ends[-1]`` on (skipped slots) 0."""
    E = weight.shape[0]
    expert = grouped_row_experts(x.shape[0], ends)
    y = torch.bmm(x.to(weight.dtype).unsqueeze(1), weight[expert.clamp(max=E - 1)]).squeeze(1)
    return torch.where((expert < E).unsqueeze(-1), y, torch.zeros_like(y))


def grouped_matmul_weight_grad(x: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Reference of ``torch.ops.moe_fast.grouped_matmul_weight_grad``: [E, in, out] in grad's dtype,
    expert e's ``x[rows_e]^T @ grad[rows_e]``."""
    E = ends.shape[0]
    expert = grouped_row_experts(x.shape[0], ends)
    onehot = torch.nn.functional.one_hot(expert, E + 1)[:, :E].to(grad.dtype)
    return torch.einsum("re,ri,ro->eio", onehot, x.to(grad.dtype), grad)
