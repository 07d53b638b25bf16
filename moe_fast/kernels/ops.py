"""Python wrappers and fake kernels of the moe_fast ops.

Each op is ``torch.ops.moe_fast.<name>``; the wrappers here only turn friendly arguments (a
float beta, a list of candidate sets) into the schema's. Semantics: :mod:`moe_fast.reference`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from moe_fast.kernels import extension as _extension  # noqa: F401  (registers torch.ops.moe_fast)
from moe_fast.kernels.beta_args import beta_values
from moe_fast.kernels.routing_spec import RoutingSpec

__all__ = ["route", "route_spec", "routing_op_args", "expert_gram", "subset_loss", "subset_loss_spec", "RouteResult"]


class RouteResult(NamedTuple):
    """What :func:`route` and :func:`route_spec` return (and their spec, ``reference.route_spec``)."""

    weights: torch.Tensor  # [T, k] float32
    ids: torch.Tensor  # [T, k] int32, E for a skipped slot
    counts: torch.Tensor  # [E] int32
    offsets: torch.Tensor  # [E + 1] int32
    perm: torch.Tensor  # [T * k] int32


def route(
    logits: torch.Tensor,
    k: int,
    renormalize: bool = True,
    beta: float | Sequence[float] | torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> RouteResult:
    """Fused router: softmax, top-k, renormalize, threshold skipping, and the dispatch plan.

    Args:
        logits: [T, E] float32, bfloat16 or float16, contiguous; 1 <= E <= 512.
        k: experts per token, 1..8, at most the number of allowed experts.
        renormalize: weights of the chosen slots sum to 1 (Mixtral; Qwen/OLMoE with norm_topk_prob).
        beta: skip threshold in [0, 1], one for all slots or k - 1 values for slots 1..k-1. Slot j is
            skipped when w_j < beta_j * w_0. None: no skipping.
        keep: [E] bool on the logits' device; False experts can never be chosen (pruned). On a
            GPU the "at least k allowed" check runs on the device (no host synchronization).

    Returns:
        RouteResult(weights [T, k] float32, ids [T, k] int32 (E marks a skipped slot),
        counts [E] int32, offsets [E + 1] int32, perm [T * k] int32). ``perm[offsets[e]:offsets[e+1]]``
        are the flat slots ``t * k + j`` routed to expert e, tokens ascending; skipped slots follow
        ``offsets[E]``.
    """
    return RouteResult(*torch.ops.moe_fast.route(logits, k, renormalize, beta_values(beta), keep))


def routing_op_args(spec: RoutingSpec, device: torch.device | str | None = None) -> dict:
    """The route op's descriptor arguments for ``spec``: the one place a RoutingSpec meets the schema.

    Returns the keyword arguments ``k, renormalize, scoring, selection_bias, n_group, topk_group,
    scaling`` of ``torch.ops.moe_fast.route`` (the bias as float32 on ``device``). ``router_bias``
    is not among them: it is already part of the logits.
    """
    bias = spec.selection_bias
    if bias is not None:
        bias = bias.detach().to(device=device, dtype=torch.float32).contiguous()
    return dict(
        k=int(spec.top_k),
        renormalize=bool(spec.renormalize),
        scoring=spec.scoring,
        selection_bias=bias,
        n_group=int(spec.n_group),
        topk_group=int(spec.topk_group),
        scaling=float(spec.scaling),
    )


def route_spec(
    logits: torch.Tensor,
    spec: RoutingSpec,
    beta: float | Sequence[float] | torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    selection_bias: torch.Tensor | None = None,
) -> RouteResult:
    """The fused router for any routing descriptor (docs/ROUTING.md), and the dispatch plan.

    The kernel of ``moe_fast.reference.route_spec``: the same ids, counts, offsets and perm, the
    weights within float32 rounding. A plain softmax spec (scaling 1) runs ``route``'s kernel
    unchanged; every other spec a general kernel.

    Args:
        logits: [T, E] float32, bfloat16 or float16, contiguous; 1 <= E <= 512. The router's
            output 0 (gpt-oss: with its bias; DeepSeek: without the selection bias).
        spec: the router's RoutingSpec; ``top_k`` 1..8. Its selection_bias ([E]) is moved to the
            logits' device as float32; it must be finite.
        beta: skip threshold in [0, 1], one for all slots or k - 1 values. Slot j is skipped when
            w_j < beta_j * w_0 on the final weights. None: no skipping.
        keep: [E] bool on the logits' device; False experts are never chosen and do not count in
            group scores.
        selection_bias: [E], used instead of ``spec.selection_bias`` when given: a patched router
            passes its live buffer (any float dtype) without building a spec per call, which
            torch.compile would have to trace.

    Returns:
        RouteResult as :func:`route`: weights [T, k] float32 (times ``spec.scaling``), ids [T, k]
        int32 (E marks a skipped slot), counts [E], offsets [E + 1], perm [T * k] int32.
    """
    args = routing_op_args(spec, logits.device)
    if selection_bias is not None:
        args["selection_bias"] = selection_bias.detach().to(device=logits.device, dtype=torch.float32).contiguous()
    k = args.pop("k")
    renormalize = args.pop("renormalize")
    return RouteResult(
        *torch.ops.moe_fast.route(logits, k, renormalize, beta_values(beta), keep, **args)
    )


def expert_gram(
    outputs: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token inner products of the rank-bounded expert outputs (the rank bound; the quadratic form is in reference.subset_loss).

    Args:
        outputs: [T, M, H] float32/bfloat16/float16: token t's outputs of its M ranked experts.
        target: optional [T, H], same dtype: the target layer output (progressive mode).

    Returns:
        gram [T, M(M+1)/2] float32: <y_i, y_j> for i <= j, the upper triangle row by row
        (``moe_fast.reference.triu_pairs``); cross [T, M] float32 = <y_i, target> and
        target_sq [T] float32 = ||target||^2, or empty ([T, 0], [0]) without a target.
    """
    return tuple(torch.ops.moe_fast.expert_gram(outputs, target))


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
    """Squared reconstruction error of C candidate keep-sets, summed per token group.

    Args:
        gram: [T, M(M+1)/2] float32 from :func:`expert_gram`.
        ids: [T, M] int32: each token's M ranked experts, exactly ``route(logits, M).ids`` (checked:
            in [0, E), each expert once, in routing order, the row's top M).
        logits: [T, E] float32 router logits.
        keep: [C, E] bool: candidate c keeps the experts where True. Each must keep >= k experts
            and drop at most M - k. May stay on the CPU when the rest is on a GPU.
        group: [T] int64 in [0, num_groups): e.g. the calibration batch of each token. May stay on
            the CPU when the rest is on a GPU. With keep and group on the CPU a GPU call does not
            synchronize with the host (each given on the GPU costs one synchronization).
        k: experts per token.
        target_weights: [T, M] float32, layer-wise mode: the unpruned routing weights over the M
            ranked slots; the error is d^T G d with d = w^S - target_weights.
        cross, target_sq: [T, M] and [T] float32, progressive mode: <y_i, z> and ||z||^2 of the
            target z; the error is w^T G w - 2 w . cross + target_sq.

    Returns:
        [C, num_groups] float64. The paper's objective is ``out.sqrt().sum(1)`` with one group per
        calibration batch; the MSE objective is ``out.sum(1)``.
    """
    return torch.ops.moe_fast.subset_loss(
        gram, ids, logits, keep, group, num_groups, k, renormalize, target_weights, cross, target_sq
    )


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
    """:func:`subset_loss` for any non-grouped routing descriptor (docs/ROUTING.md).

    The kernel of ``moe_fast.reference.subset_loss_spec``. A candidate routes each token to the
    first ``spec.top_k`` experts it keeps of the token's ranked row, weighted as ``spec`` weighs
    them (softmax: as :func:`subset_loss`; softmax_topk: softmax of the chosen logits; sigmoid: the
    unbiased scores, renormalized if ``spec.renormalize``; times ``spec.scaling``). A plain softmax
    spec (scaling 1) is :func:`subset_loss` bit for bit.

    Args:
        gram, logits, keep, group, num_groups, target_weights, cross, target_sq: as
            :func:`subset_loss`. logits [T, E] float32 are the router's output 0 (without the
            selection bias); target_weights [T, M] float32 the unpruned final weights (with scaling).
        ids: [T, M] int32: each token's M ranked experts in ``spec``'s order, exactly
            ``reference.rank_spec(logits, spec)[:, :M]`` (sigmoid: by biased score; checked).
        spec: the router's RoutingSpec, not grouped (``topk_group < n_group`` raises: a candidate's
            experts then depend on group scores, not on a prefix of the ranked row). Its
            selection_bias ([E]) is moved to the logits' device as float32.

    Returns:
        [C, num_groups] float64, as :func:`subset_loss`.
    """
    args = routing_op_args(spec, logits.device)
    k = args.pop("k")
    renormalize = args.pop("renormalize")
    return torch.ops.moe_fast.subset_loss(
        gram, ids, logits, keep, group, num_groups, k, renormalize, target_weights, cross, target_sq, **args
    )


@torch.library.register_fake("moe_fast::route")
def _route_fake(
    logits, k, renormalize=True, beta=None, keep=None, scoring="softmax", selection_bias=None, n_group=1,
    topk_group=1, scaling=1.0,
):
    torch._check(logits.dim() == 2, lambda: "moe_fast.route: logits must be [T, E]")
    T, E = logits.shape
    torch._check(1 <= k <= min(8, E), lambda: f"moe_fast.route: k must be in 1..8 and at most E = {E}, got {k}")
    if keep is not None:
        torch._check(
            keep.device == logits.device,
            lambda: f"moe_fast.route: keep must be on {logits.device} like the other inputs, got {keep.device}",
        )
    torch._check(
        scoring in ("softmax", "sigmoid", "softmax_topk"),
        lambda: f"moe_fast.route: scoring must be 'softmax', 'sigmoid' or 'softmax_topk', got {scoring!r}",
    )
    if selection_bias is not None:
        torch._check(
            selection_bias.dim() == 1 and selection_bias.shape[0] == E and selection_bias.dtype == torch.float32,
            lambda: f"moe_fast.route: selection_bias must be [E] = [{E}] float32",
        )
        torch._check(
            selection_bias.device == logits.device,
            lambda: f"moe_fast.route: selection_bias must be on {logits.device} like the other inputs, got {selection_bias.device}",
        )
    i32 = dict(dtype=torch.int32, device=logits.device)
    return (
        logits.new_empty(T, k, dtype=torch.float32),
        logits.new_empty(T, k, **i32),
        logits.new_empty(E, **i32),
        logits.new_empty(E + 1, **i32),
        logits.new_empty(T * k, **i32),
    )


@torch.library.register_fake("moe_fast::expert_gram")
def _expert_gram_fake(outputs, target=None):
    torch._check(outputs.dim() == 3, lambda: "moe_fast.expert_gram: outputs must be [T, M, H]")
    T, M, _ = outputs.shape
    f32 = dict(dtype=torch.float32)
    has = target is not None
    return (
        outputs.new_empty(T, M * (M + 1) // 2, **f32),
        outputs.new_empty(T, M if has else 0, **f32),
        outputs.new_empty(T if has else 0, **f32),
    )


@torch.library.register_fake("moe_fast::subset_loss")
def _subset_loss_fake(
    gram, ids, logits, keep, group, num_groups, k, renormalize=True, target_weights=None, cross=None, target_sq=None,
    scoring="softmax", selection_bias=None, n_group=1, topk_group=1, scaling=1.0,
):
    torch._check(
        scoring in ("softmax", "sigmoid", "softmax_topk"),
        lambda: f"moe_fast.subset_loss: scoring must be 'softmax', 'sigmoid' or 'softmax_topk', got {scoring!r}",
    )
    torch._check(
        topk_group >= n_group,
        lambda: "moe_fast.subset_loss: grouped routing (topk_group < n_group) is not supported yet",
    )
    if selection_bias is not None:
        torch._check(
            selection_bias.dim() == 1 and selection_bias.shape[0] == logits.shape[-1]
            and selection_bias.dtype == torch.float32,
            lambda: "moe_fast.subset_loss: selection_bias must be [E] float32",
        )
    return gram.new_empty(keep.shape[0], num_groups, dtype=torch.float64)
