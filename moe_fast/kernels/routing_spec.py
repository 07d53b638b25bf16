"""How a family's router turns logits into top-k experts and weights, as data.

Why a descriptor: routing used to be written into every module that needs it (softmax over all
experts, a logit gap for skipping). Families such as DeepSeek-V3, GLM-4.5 and gpt-oss route
differently; one frozen value that says how lets the reference, the kernels, patching, skipping
and pruning share one definition. The adapter owns it (``MoEAdapter.routing``). The fields, what
each family sets and the exact semantics: docs/ROUTING.md; the semantics themselves are
``moe_fast.reference.route_spec``.

This module imports nothing from moe_fast: every layer may use it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

Scoring = Literal["softmax", "sigmoid", "softmax_topk"]
SCORINGS: tuple[str, ...] = ("softmax", "sigmoid", "softmax_topk")


@dataclass(frozen=True, eq=False)
class RoutingSpec:
    """One router's rule (docs/ROUTING.md; semantics in ``moe_fast.reference.route_spec``).

    scoring: ``softmax`` (softmax over all experts, Mixtral/Qwen/OLMoE), ``sigmoid`` (independent
        sigmoid scores, DeepSeek-V3/GLM-4.5) or ``softmax_topk`` (softmax over the k selected
        logits only, gpt-oss).
    top_k: experts per token.
    renormalize: divide the k weights by their sum (``norm_topk_prob``).
    scaling: multiplies the final weights (``routed_scaling_factor``).
    selection_bias: [E] float32 added to the scores only for choosing (DeepSeek's
        ``e_score_correction_bias``), or None. Per layer: a config-level spec has None.
    n_group, topk_group: experts split into ``n_group`` equal groups of consecutive indices; only
        the ``topk_group`` groups with the best group scores are eligible. 1, 1 = no groups.
    router_bias: the router's linear layer has a bias (gpt-oss). It is part of the logits; pruning
        must slice it with the router's rows.
    """

    scoring: Scoring = "softmax"
    top_k: int = 2
    renormalize: bool = True
    scaling: float = 1.0
    selection_bias: torch.Tensor | None = None
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"RoutingSpec: scoring must be one of {SCORINGS}, got {self.scoring!r}")
        for name in ("top_k", "n_group", "topk_group"):  # 2.7 must not quietly route as 2
            value = getattr(self, name)
            try:
                operator.index(value)
            except TypeError:
                raise ValueError(f"RoutingSpec: {name} must be an integer, got {value!r}") from None
            if isinstance(value, bool):
                raise ValueError(f"RoutingSpec: {name} must be an integer, got {value!r}")
        if int(self.top_k) < 1:
            raise ValueError(f"RoutingSpec: top_k must be at least 1, got {self.top_k}")
        if not (math.isfinite(float(self.scaling)) and float(self.scaling) > 0.0):
            raise ValueError(f"RoutingSpec: scaling must be a finite positive number, got {self.scaling}")
        if int(self.n_group) < 1 or not 1 <= int(self.topk_group) <= int(self.n_group):
            raise ValueError(
                f"RoutingSpec: need n_group >= 1 and 1 <= topk_group <= n_group, got {self.n_group}, {self.topk_group}"
            )
        if self.selection_bias is not None and self.selection_bias.dim() != 1:
            raise ValueError(f"RoutingSpec: selection_bias must be [E], got shape {tuple(self.selection_bias.shape)}")
        if self.scoring != "sigmoid" and (self.selection_bias is not None or self.grouped):
            # Ranking softmax routers by logit (today's ties) and by biased probability differ;
            # no supported family needs the combination, so it is not defined.
            raise ValueError(f"RoutingSpec: a selection bias and expert groups need scoring 'sigmoid', got {self.scoring!r}")

    @property
    def grouped(self) -> bool:
        """Whether group selection can exclude experts (more than one group, not all eligible)."""
        return self.topk_group < self.n_group

    @property
    def is_plain_softmax(self) -> bool:
        """The router the kernels have always served: softmax over all experts, no scaling."""
        return self.scoring == "softmax" and self.scaling == 1.0

    def with_selection_bias(self, bias: torch.Tensor | None) -> RoutingSpec:
        """The same spec with one layer's selection bias (detached, float32)."""
        return replace(self, selection_bias=None if bias is None else bias.detach().float())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingSpec):
            return NotImplemented
        if self._scalars() != other._scalars():
            return False
        a, b = self.selection_bias, other.selection_bias
        if a is None or b is None:
            return a is b
        return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())

    def __hash__(self) -> int:
        return hash(self._scalars())

    def _scalars(self) -> tuple:
        return (self.scoring, int(self.top_k), bool(self.renormalize), float(self.scaling),
                int(self.n_group), int(self.topk_group), bool(self.router_bias))


def softmax_routing(top_k: int, renormalize: bool) -> RoutingSpec:
    """Mixtral, Qwen2/3-MoE, OLMoE: softmax over all experts, top-k, optional renormalization."""
    return RoutingSpec(scoring="softmax", top_k=int(top_k), renormalize=bool(renormalize))


def grouped_sigmoid_routing(config) -> RoutingSpec:
    """DeepSeek-V3 (and Kimi-K2-style checkpoints), GLM-4.5: the config-level spec (no bias yet).

    The per-layer ``e_score_correction_bias`` is added with ``with_selection_bias``.
    """
    return RoutingSpec(
        scoring="sigmoid",
        top_k=int(config.num_experts_per_tok),
        renormalize=bool(getattr(config, "norm_topk_prob", True)),
        scaling=float(getattr(config, "routed_scaling_factor", 1.0)),
        n_group=int(getattr(config, "n_group", 1) or 1),
        topk_group=int(getattr(config, "topk_group", 1) or 1),
    )


def topk_softmax_routing(config) -> RoutingSpec:
    """gpt-oss: a router with a bias, softmax over the k selected logits (they sum to 1 already)."""
    return RoutingSpec(scoring="softmax_topk", top_k=int(config.num_experts_per_tok), renormalize=False, router_bias=True)


# The config-level specs of the non-softmax families; their adapters call the same builders.
_BUILDERS: dict[str, Callable[[object], RoutingSpec]] = {
    "deepseek_v3": grouped_sigmoid_routing,
    "kimi_k2": grouped_sigmoid_routing,
    "glm4_moe": grouped_sigmoid_routing,
    "gpt_oss": topk_softmax_routing,
}


def routing_spec_from_config(config) -> RoutingSpec:
    """The config-level spec of a non-softmax family from its config alone (no per-layer bias).

    Families with an adapter: ``get_adapter(config).routing()``.
    """
    model_type = getattr(config, "model_type", None)
    builder = _BUILDERS.get(model_type)
    if builder is None:
        raise ValueError(f"routing_spec_from_config: no routing builder for model_type {model_type!r}; known: {sorted(_BUILDERS)}")
    return builder(config)
