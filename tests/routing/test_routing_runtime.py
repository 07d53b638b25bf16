"""The runtime routing pieces (moe_fast.routing.runtime) equal the spec's (moe_fast.reference) exactly.

Why exactly: the library ranks with the runtime copy while ``ops.subset_loss_spec`` and the spec
check the ranking; a near-tie that fell differently would refuse a valid call.
"""

from __future__ import annotations

import pytest
import torch

from moe_fast import reference
from moe_fast.routing import runtime as routing_runtime
from moe_fast.kernels.routing_spec import RoutingSpec, softmax_routing
from helpers.logits import special_logits

T, E = 40, 16


def _specs() -> list[RoutingSpec]:
    bias = torch.linspace(-0.3, 0.3, E)
    return [
        softmax_routing(2, True),
        softmax_routing(4, False),
        RoutingSpec(top_k=3, scoring="softmax_topk", renormalize=True),
        RoutingSpec(top_k=4, scoring="sigmoid", renormalize=True, scaling=2.5, selection_bias=bias),
        RoutingSpec(top_k=2, scoring="sigmoid", renormalize=False),
        RoutingSpec(top_k=4, scoring="sigmoid", renormalize=True, selection_bias=bias, n_group=4, topk_group=2),
    ]


SPECS = _specs()


def _cases(seed: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    torch.manual_seed(seed)
    keep = torch.rand(E) > 0.3
    keep[:8] = True  # every group keeps some experts; at least k allowed
    return [(special_logits(T, E), None), (special_logits(T, E, ties=True), None), (special_logits(T, E), keep),
            (special_logits(T, E, dtype=torch.bfloat16, ties=True), keep)]


@pytest.mark.parametrize("seed", [0, 1])
def test_ranking_and_ratios_equal_the_spec(seed):
    for logits, keep in _cases(seed):
        assert torch.equal(routing_runtime.sanitize_logits(logits), reference.sanitize_logits(logits))
        for got, want in zip(routing_runtime.rank_experts(logits, keep), reference.rank_experts(logits, keep)):
            assert torch.equal(got, want)
        for spec in SPECS:
            assert torch.equal(routing_runtime.rank_spec(logits, spec, keep), reference.rank_spec(logits, spec, keep)), spec
            got, want = routing_runtime.skip_ratios(logits, spec, keep), reference.skip_ratios(logits, spec, keep)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), spec
            if spec.scoring == "sigmoid":
                for a, b in zip(routing_runtime.sigmoid_choice(logits, spec), reference.sigmoid_choice(logits, spec)):
                    assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_eligibility_equals_the_spec(seed):
    spec = SPECS[-1]
    for logits, keep in _cases(seed):
        _, choice = reference.sigmoid_choice(logits, spec)
        allowed = torch.ones_like(choice, dtype=torch.bool) if keep is None else keep.expand_as(choice)
        want = reference.eligible_experts(choice, allowed, spec)
        assert torch.equal(routing_runtime.eligible_experts(choice, allowed, spec), want)


def test_subset_weights_equal_the_spec():
    torch.manual_seed(2)
    for logits, _ in _cases(2):
        keeps = torch.rand(5, E) > 0.4
        keeps[:, :4] = True
        keeps[0] = True
        for spec in SPECS[:-1]:  # grouped routers have no subset weights
            ids = reference.rank_spec(logits, spec)[:, :8]
            got = routing_runtime.subset_weights_spec(ids, logits, keeps, spec)
            want = reference.subset_weights_spec(ids, logits, keeps, spec)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num()), spec
    with pytest.raises(ValueError, match="grouped routing"):
        routing_runtime.subset_weights_spec(ids, logits, keeps, SPECS[-1])


def test_dispatch_plan_and_pairs_equal_the_spec():
    torch.manual_seed(3)
    ids = torch.randint(0, E + 1, (T, 4), dtype=torch.int32)  # E: skipped slots
    for got, want in zip(routing_runtime.dispatch_plan(ids, E), reference.dispatch_plan(ids, E)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for m in (1, 5):
        for got, want in zip(routing_runtime.triu_pairs(m), reference.triu_pairs(m)):
            assert torch.equal(got, want)


def test_the_cases_exercise_ties_masks_and_groups():
    """The comparisons above mean something: the inputs hold ties, masked experts, and rows where
    the grouped router's eligible groups change the order from plain score order."""
    logits, keep = _cases(0)[3]
    lg = reference.sanitize_logits(logits)
    assert (lg[:, :, None] == lg[:, None, :]).sum() > T * E  # ties beyond the diagonal
    assert not bool(keep.all())
    spec = SPECS[-1]
    ungrouped = RoutingSpec(top_k=4, scoring="sigmoid", renormalize=True, selection_bias=spec.selection_bias)
    assert not torch.equal(routing_runtime.rank_spec(logits, spec), routing_runtime.rank_spec(logits, ungrouped))
