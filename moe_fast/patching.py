"""One-call patching of a loaded Hugging Face MoE model: fused routing and skip-aware experts.

``patch(model, betas)`` replaces each router's ``forward`` (on the instance, nothing in
transformers is edited) with one that calls the fused ``moe_fast.ops.route`` op with the family's
routing descriptor (``adapter.routing(block)``, docs/ROUTING.md) and selects the
registered ``moe_fast`` experts implementation, which runs only the non-skipped slots from the
router's dispatch plan. The router keeps its return contract ``(router_logits, scores,
indices)``; ``indices`` holds E for a skipped slot. ``unpatch`` restores stock behaviour.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from moe_fast import experts as fast_experts
from moe_fast import ops
from moe_fast.adapters import get_adapter
from moe_fast.betas import BetaSpec, normalize_betas, skipping_record
from moe_fast.config_record import SKIPPING_KEY, remove_record_entry, set_record_entry
from moe_fast.routing_spec import RoutingSpec

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
    experts: nn.Module

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


@dataclass
class PatchState:
    previous_experts_implementation: str | None
    layers: list[int]


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
        fast_experts.stash_plan(state.experts, indices, routed.perm, routed.offsets)
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


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_moe_fast_patch", None), PatchState)


def patch(model: nn.Module, betas: BetaSpec = None) -> nn.Module:
    """Turns on fused routing and skip-aware experts in place; returns the model.

    Args:
        model: a loaded transformers MoE model of a supported family (Mixtral, Qwen2-MoE,
            Qwen3-MoE, OLMoE, DeepSeek-V3, GLM-4.5, gpt-oss), whatever experts implementation it
            was loaded with.
        betas: skip thresholds: None (no skipping), one number, the result of
            ``calibrate_skipping``, one entry per MoE layer, or {layer index: entry}.

    Calling it again changes the betas (idempotent otherwise). The betas are recorded in
    ``model.config.moe_fast`` so that ``save_pretrained`` / ``moe_fast.save`` remember them.
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
    per_layer = normalize_betas(betas, [ref.layer for ref in blocks], k)
    for ref in blocks:
        _experts_config(ref.experts)
        for attr in ("weight", "top_k", "hidden_dim"):
            if not hasattr(ref.router, attr):
                raise ValueError(f"moe_fast.patch: {type(ref.router).__name__} lacks .{attr}; unsupported router")

    if not is_patched(model):
        previous = getattr(_experts_config(blocks[0].experts), "_experts_implementation", None)
        model._moe_fast_patch = PatchState(previous, [ref.layer for ref in blocks])
    for ref in blocks:
        ref.router._moe_fast = RouterState(
            layer=ref.layer,
            spec=adapter.routing(),
            selection_bias_attr=adapter.selection_bias_attr,
            logits=adapter.compute_router_logits,
            scores_float32=adapter.router_scores_float32,
            beta=per_layer[ref.layer],
            experts=ref.experts,
        )
        ref.router.forward = types.MethodType(_fused_router_forward, ref.router)
    _set_experts_implementation(model, blocks, fast_experts.NAME)
    set_record_entry(model.config, SKIPPING_KEY, skipping_record(betas, [ref.layer for ref in blocks], k))
    skipping = sum(per_layer[ref.layer] is not None for ref in blocks)
    log.info("moe_fast: patched %d MoE blocks (%s), skipping on %d", len(blocks), adapter.family, skipping)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restores the stock routers and the experts implementation the model had before ``patch``."""
    state = getattr(model, "_moe_fast_patch", None)
    if not isinstance(state, PatchState):
        return model
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    for ref in blocks:
        ref.router.__dict__.pop("forward", None)
        ref.router.__dict__.pop("_moe_fast", None)
        ref.experts.__dict__.pop("_moe_fast_plan", None)
    _set_experts_implementation(model, blocks, state.previous_experts_implementation)
    remove_record_entry(model.config, SKIPPING_KEY)
    del model._moe_fast_patch
    return model


def current_betas(model: nn.Module) -> dict[int, list[float] | None]:
    """{layer: betas or None} of a patched model ({} when not patched)."""
    if not is_patched(model):
        return {}
    return {ref.layer: ref.router._moe_fast.beta for ref in get_adapter(model).moe_blocks(model)}


def suspend_skipping(model: nn.Module) -> Any:
    """Turns skipping off on a patched model (for calibration); returns what ``resume_skipping`` needs."""
    if not is_patched(model):
        return None
    saved = {}
    for ref in get_adapter(model).moe_blocks(model):
        saved[ref.layer] = ref.router._moe_fast.beta
        ref.router._moe_fast.beta = None
    return saved


def resume_skipping(model: nn.Module, saved: Any) -> None:
    if not saved:
        return
    for ref in get_adapter(model).moe_blocks(model):
        ref.router._moe_fast.beta = saved[ref.layer]
