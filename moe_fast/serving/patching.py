"""One-call patching of a loaded Hugging Face MoE model: fused routing and skip-aware experts.

``patch(model, betas)`` replaces each router's ``forward`` (on the instance, nothing in
transformers is edited) with one that calls the fused ``moe_fast.ops.route`` op with the family's
routing descriptor (``adapter.routing(block)``, docs/ROUTING.md) and selects the
registered ``moe_fast`` experts implementation, which runs only the non-skipped slots from the
router's dispatch plan (handed over through the block's ``experts.PlanChannel``). The router keeps
its return contract ``(router_logits, scores, indices)``; ``indices`` holds E for a skipped slot.

``patch`` returns a :class:`PatchHandle`, also kept on the model (:func:`patch_handle`): the
blocks it patched, their betas, and ``unpatch``. Helpers that work on a patched model (skipping
calibration, the skip counter, unpatching) use its blocks instead of finding them again through
the adapter. ``unpatch`` (or ``handle.unpatch()``) restores stock behaviour.
"""

from __future__ import annotations

import logging
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from moe_fast.serving import experts as fast_experts
from moe_fast.kernels import ops
from moe_fast.adapters import MoEBlockRef, get_adapter
from moe_fast.serving.betas import BetaSpec, normalize_betas, skipping_record
from moe_fast.checkpoint.config_record import SKIPPING_KEY, remove_record_entry, set_record_entry
from moe_fast.kernels.routing_spec import RoutingSpec

log = logging.getLogger(__name__)


@dataclass
class RouterState:
    """What a patched router needs besides its own weights."""

    layer: int
    spec: RoutingSpec  # the family's routing from the config (no selection bias: see selection_bias_attr)
    selection_bias_attr: str | None  # the router's bias buffer, read at every forward (never copied)
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # the stock router's output 0
    scores_float32: bool
    beta: list[float] | None
    plans: fast_experts.PlanChannel  # to the experts of the same block (shared with experts.moe_fast_plans)

    @property
    def renormalize(self) -> bool:
        return self.spec.renormalize

    def selection_bias(self, router: nn.Module) -> torch.Tensor | None:
        """The router's selection bias buffer as it is now (None for families without one).

        Why not a copy taken at patch time: ``load_state_dict(assign=True)``, a reassigned buffer,
        ``to_empty`` or ``model.to(...)`` replace the buffer, and the patched router must route
        with the new values as the stock one does.
        """
        return None if self.selection_bias_attr is None else getattr(router, self.selection_bias_attr)


@dataclass(eq=False)
class PatchHandle:
    """What ``patch`` did to one model: the blocks it patched, their betas, and how to undo it.

    Why: the helpers that act on a patched model act on exactly the blocks ``patch`` patched;
    finding them again through the adapter would be a second lookup that could disagree. ``patch``
    returns the handle and keeps it on the model (``patch_handle(model)``); the model itself is
    patched in place and is ``handle.model``.
    """

    model: nn.Module = field(repr=False)
    blocks: tuple[MoEBlockRef, ...] = field(repr=False)
    top_k: int
    previous_experts_implementation: str | None

    @property
    def layers(self) -> list[int]:
        """Decoder layer index of each patched MoE block."""
        return [ref.layer for ref in self.blocks]

    @property
    def betas(self) -> dict[int, list[float] | None]:
        """{layer: thresholds or None}, read from the routers (what the next forward uses)."""
        return {ref.layer: _router_state(ref).beta for ref in self.blocks}

    @property
    def active(self) -> bool:
        """Whether the model is still patched by this handle (not unpatched since)."""
        return getattr(self.model, "_moe_fast_patch", None) is self

    @contextmanager
    def skipping_off(self) -> Iterator[None]:
        """Routes without skipping inside the block (skipping calibration measures the unskipped model)."""
        saved = {ref.layer: _router_state(ref).beta for ref in self.blocks}
        for ref in self.blocks:
            _router_state(ref).beta = None
        try:
            yield
        finally:
            for ref in self.blocks:
                _router_state(ref).beta = saved[ref.layer]

    def unpatch(self) -> nn.Module:
        """Restores the stock routers and the previous experts implementation; returns the model."""
        if not self.active:
            return self.model
        for ref in self.blocks:
            ref.router.__dict__.pop("forward", None)
            ref.router.__dict__.pop("_moe_fast", None)
            ref.experts.__dict__.pop(fast_experts.PLAN_CHANNEL_ATTR, None)
        _set_experts_implementation(self.model, self.blocks, self.previous_experts_implementation)
        remove_record_entry(self.model.config, SKIPPING_KEY)
        del self.model._moe_fast_patch
        return self.model

    def __getattr__(self, name: str):
        # Only reached for names the handle lacks: say where the model is (patch used to return it).
        raise AttributeError(
            f"'PatchHandle' has no attribute {name!r}; moe_fast.patch patches the model in place and returns "
            "this handle: the model is handle.model"
        )


def _router_state(ref: MoEBlockRef) -> RouterState:
    return ref.router._moe_fast


def _fused_router_forward(self: nn.Module, hidden_states: torch.Tensor):
    """Drop-in for every supported router's ``forward``: (router_logits, scores, indices).

    The contract all families' MoE blocks expect: the logits as the stock router returns them
    (float32 for the sigmoid routers, with the router bias for gpt-oss), the final top-k weights
    ([T, k], float32 or the logits' dtype as the stock router) and int64 indices, E for a skipped slot.
    """
    state: RouterState = self._moe_fast
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = state.logits(self, hidden_states)
    if state.spec.is_plain_softmax:  # the long-standing call, unchanged
        routed = ops.route(router_logits.detach().contiguous(), self.top_k, state.renormalize, state.beta)
    else:
        routed = ops.route_spec(router_logits.detach().contiguous(), state.spec, state.beta,
                                selection_bias=state.selection_bias(self))
    indices = routed.ids.long()
    weights = routed.weights
    if torch.is_grad_enabled() and router_logits.requires_grad:
        weights = _differentiable_weights(router_logits, indices, weights, state.spec)
    scores = weights if state.scores_float32 else weights.to(router_logits.dtype)
    if not torch.compiler.is_compiling():  # compiled experts sort the slots themselves (static shapes)
        state.plans.put(indices, routed.perm, routed.offsets)
    return router_logits, scores, indices


def _differentiable_weights(logits: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """The kernel's weights recomputed with autograd (training through a patched router).

    Exact values and gradients for softmax routing, gpt-oss' top-k softmax and renormalized sigmoid
    routing; for sigmoid without renormalization the skip rescale factor is held constant.
    """
    E = logits.shape[-1]
    kept = indices < E
    safe = indices.clamp(max=E - 1)
    if spec.scoring == "softmax_topk":
        top = torch.gather(logits.float(), -1, safe).masked_fill(~kept, float("-inf"))
        return torch.softmax(top, dim=-1) * spec.scaling
    if spec.scoring == "sigmoid":
        s = torch.gather(torch.sigmoid(logits.float()), -1, safe) * kept
        if spec.renormalize:
            return s / (s.sum(-1, keepdim=True) + 1e-20) * spec.scaling
        return s * (weights / s.masked_fill(~kept, 1.0)).detach()
    probs = torch.softmax(logits.float(), dim=-1)
    p = torch.gather(probs, -1, safe) * kept
    if spec.renormalize:
        return p / p.sum(-1, keepdim=True)
    # Without renormalization the kept slots still sum to what the top-k summed (reference.route).
    top_sum = torch.topk(probs, indices.shape[-1], dim=-1).values.sum(-1, keepdim=True)
    return p * (top_sum / p.sum(-1, keepdim=True))


def _experts_config(experts: nn.Module):
    config = getattr(experts, "config", None)
    if config is None or not hasattr(config, "_experts_implementation"):
        raise ValueError(
            f"moe_fast.patch: {type(experts).__name__} does not dispatch through transformers' ExpertsInterface "
            "(needs transformers >= 5.7 and a model class decorated with @use_experts_implementation)"
        )
    return config


def _set_experts_implementation(model: nn.Module, blocks, name: str | None) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    for ref in blocks:  # also covers expert modules whose config is not the model's
        config = _experts_config(ref.experts)
        if config._experts_implementation != name:
            config._experts_implementation_internal = name


def patch_handle(model: nn.Module) -> PatchHandle | None:
    """The handle of the ``patch`` call that patched ``model`` (None when it is not patched)."""
    handle = getattr(model, "_moe_fast_patch", None)
    return handle if isinstance(handle, PatchHandle) else None


def is_patched(model: nn.Module) -> bool:
    return patch_handle(model) is not None


def patch(model: nn.Module, betas: BetaSpec = None) -> PatchHandle:
    """Turns on fused routing and skip-aware experts in place; returns the :class:`PatchHandle`.

    Args:
        model: a loaded transformers MoE model of a supported family (Mixtral, Qwen2-MoE,
            Qwen3-MoE, OLMoE, DeepSeek-V3, GLM-4.5, gpt-oss), whatever experts implementation it
            was loaded with.
        betas: skip thresholds: None (no skipping), one number, the result of
            ``calibrate_skipping``, one entry per MoE layer, or {layer index: entry}.

    Calling it again changes the betas and returns the same handle (idempotent otherwise). The
    betas are recorded in ``model.config.moe_fast`` so that ``save_pretrained`` / ``moe_fast.save``
    remember them. The model stays the caller's: ``handle.model`` is it.
    """
    fast_experts.register()
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    if not blocks:
        raise ValueError(f"moe_fast.patch: found no MoE blocks in this {adapter.family} model")
    k = adapter.top_k
    E = int(blocks[0].router.weight.shape[0])
    if not (1 <= k <= min(8, E) and E <= 512):
        raise ValueError(f"moe_fast.patch: the fused router supports up to 512 experts and top-k <= 8; got E={E}, k={k}")
    layers = [ref.layer for ref in blocks]
    per_layer = normalize_betas(betas, layers, k)
    for ref in blocks:
        _experts_config(ref.experts)
        for attr in ("weight", "top_k", "hidden_dim"):
            if not hasattr(ref.router, attr):
                raise ValueError(f"moe_fast.patch: {type(ref.router).__name__} lacks .{attr}; unsupported router")

    handle = patch_handle(model)
    if handle is None:
        previous = getattr(_experts_config(blocks[0].experts), "_experts_implementation", None)
        handle = PatchHandle(model, tuple(blocks), k, previous)
        model._moe_fast_patch = handle
    else:
        handle.blocks, handle.top_k = tuple(blocks), k
    for ref in blocks:
        plans = fast_experts.PlanChannel()
        setattr(ref.experts, fast_experts.PLAN_CHANNEL_ATTR, plans)
        ref.router._moe_fast = RouterState(
            layer=ref.layer,
            spec=adapter.routing(),
            selection_bias_attr=adapter.selection_bias_attr,
            logits=adapter.compute_router_logits,
            scores_float32=adapter.router_scores_float32,
            beta=per_layer[ref.layer],
            plans=plans,
        )
        ref.router.forward = types.MethodType(_fused_router_forward, ref.router)
    _set_experts_implementation(model, blocks, fast_experts.NAME)
    set_record_entry(model.config, SKIPPING_KEY, skipping_record(betas, layers, k))
    skipping = sum(per_layer[layer] is not None for layer in layers)
    log.info("moe_fast: patched %d MoE blocks (%s), skipping on %d", len(blocks), adapter.family, skipping)
    return handle


def unpatch(model: nn.Module | PatchHandle) -> nn.Module:
    """Restores the stock routers and the experts implementation the model had before ``patch``.

    Takes the model or the handle ``patch`` returned; returns the model (unchanged when not patched).
    """
    if isinstance(model, PatchHandle):
        return model.unpatch()
    handle = patch_handle(model)
    return model if handle is None else handle.unpatch()


def current_betas(model: nn.Module) -> dict[int, list[float] | None]:
    """{layer: betas or None} of a patched model ({} when not patched)."""
    handle = patch_handle(model)
    return {} if handle is None else handle.betas
