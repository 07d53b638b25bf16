"""subset_loss for routing descriptors without groups (sigmoid with a selection bias, softmax_topk,
any scaling): the reference against brute-force routing, the op against the reference."""

from __future__ import annotations

import math

import pytest
import torch

from moe_fast import ops, reference
from moe_fast.kernels.routing_spec import RoutingSpec, softmax_routing


def spec_of(scoring: str, k: int, E: int, renormalize: bool, scaling: float, gen: torch.Generator) -> RoutingSpec:
    if scoring == "sigmoid":
        bias = torch.randn(E, generator=gen) * 0.3
        spec = RoutingSpec(scoring="sigmoid", top_k=k, renormalize=renormalize, scaling=scaling)
        return spec.with_selection_bias(bias)
    if scoring == "softmax_topk":
        return RoutingSpec(scoring="softmax_topk", top_k=k, renormalize=renormalize, scaling=scaling)
    return RoutingSpec(scoring="softmax", top_k=k, renormalize=renormalize, scaling=scaling)


def random_candidates(E: int, k: int, M: int, C: int, gen: torch.Generator) -> torch.Tensor:
    """C keep masks dropping 0..M-k experts; the first keeps exactly k, the second drops none."""
    keep = torch.ones(C, E, dtype=torch.bool)
    for c in range(C):
        n = M - k if c == 0 else 0 if c == 1 else int(torch.randint(0, M - k + 1, (1,), generator=gen))
        keep[c, torch.randperm(E, generator=gen)[:n]] = False
    if E == M:  # then candidate 0 keeps exactly k
        assert int(keep[0].sum()) == k
    return keep


def special_logits(T: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """Random logits with ties, -inf, NaN and +inf rows."""
    logits = torch.randn(T, E, generator=gen) * 2
    logits[0] = -math.inf
    logits[1, : E // 2] = math.nan
    logits[2, 0] = math.inf
    logits[3] = 0.25  # all tied
    logits[4, ::2] = -math.inf
    logits[5, 1:3] = logits[5, 0]  # a three-way tie
    return logits


def problem(spec: RoutingSpec, T: int, E: int, M: int, gen: torch.Generator):
    logits = special_logits(T, E, gen)
    ids = reference.rank_spec(logits, spec)[:, :M].to(torch.int32)
    y = torch.randn(T, M, 8, generator=gen)
    gram, cross, target_sq = reference.expert_gram(y, torch.randn(T, 8, generator=gen))
    target_w = torch.zeros(T, M)
    target_w[:, : spec.top_k] = reference.route_spec(logits, spec).weights
    return reference.sanitize_logits(logits), ids, gram, cross, target_sq, target_w


CASES = [
    ("sigmoid", True, 2.5),
    ("sigmoid", False, 1.0),
    ("sigmoid", True, 1.0),
    ("softmax_topk", False, 1.0),
    ("softmax_topk", True, 1.0),
    ("softmax", True, 1.7),
    ("softmax", False, 0.5),
]


@pytest.mark.parametrize("scoring,renormalize,scaling", CASES)
@pytest.mark.parametrize("E,k,M", [(8, 2, 4), (8, 2, 8), (8, 1, 3), (64, 4, 6), (16, 8, 10)])
def test_reference_weights_match_brute_force(scoring, renormalize, scaling, E, k, M) -> None:
    gen = torch.Generator().manual_seed(E * 100 + k * 10 + M)
    T = 64
    spec = spec_of(scoring, k, E, renormalize, scaling, gen)
    logits = special_logits(T, E, gen)
    ids = reference.rank_spec(logits, spec)[:, :M]
    reference.check_ranked_ids(ids.to(torch.int32), logits, spec)
    keep = random_candidates(E, k, M, 12, gen)
    w = reference.subset_weights_spec(ids, logits, keep, spec)  # [C, T, M]
    for c in range(keep.shape[0]):
        r = reference.route_spec(logits, spec, keep_mask=keep[c])
        # The brute-force routing's experts are the candidate's routed slots, in order.
        routed = ids[reference.candidate_slots(ids, keep[c : c + 1], k)[0]].view(T, k)
        assert torch.equal(routed, r.ids.long())
        got = torch.zeros(T, E, dtype=torch.float64).scatter_add_(1, ids, w[c])
        want = torch.zeros(T, E, dtype=torch.float64).scatter_add_(1, r.ids.long(), r.weights.double())
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)


def test_softmax_spec_is_subset_loss_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(3)
    spec = softmax_routing(2, False)
    logits, ids, gram, cross, target_sq, target_w = problem(spec, 50, 8, 4, gen)
    keep = random_candidates(8, 2, 4, 9, gen)
    group = torch.randint(0, 3, (50,), generator=gen)
    for kw in (dict(target_weights=target_w), dict(cross=cross, target_sq=target_sq)):
        want = ops.subset_loss(gram, ids, logits, keep, group, 3, 2, False, **kw)
        assert torch.equal(ops.subset_loss_spec(gram, ids, logits, keep, group, 3, spec, **kw), want)
        ref = reference.subset_loss(gram, ids, logits, keep, group, 3, 2, False, **kw)
        assert torch.equal(reference.subset_loss_spec(gram, ids, logits, keep, group, 3, spec, **kw), ref)
    w = reference.subset_weights(ids, logits, keep, 2, False)
    assert torch.equal(reference.subset_weights_spec(ids, logits, keep, spec), w)


@pytest.mark.parametrize("scoring,renormalize,scaling", CASES)
@pytest.mark.parametrize("E,k,M", [(8, 2, 4), (8, 2, 8), (8, 1, 3), (60, 4, 6), (256, 4, 6), (384, 8, 200), (512, 8, 12), (3, 2, 3)])
def test_op_matches_reference(scoring, renormalize, scaling, E, k, M, device: str) -> None:
    gen = torch.Generator().manual_seed(E * 100 + k * 10 + M + 7)
    T = 133
    spec = spec_of(scoring, k, E, renormalize, scaling, gen)
    logits, ids, gram, cross, target_sq, target_w = problem(spec, T, E, M, gen)
    keep = random_candidates(E, k, M, 30, gen)
    group = torch.randint(0, 5, (T,), generator=gen)
    d = lambda t: t.to(device)  # noqa: E731
    for kw in (dict(target_weights=target_w), dict(cross=cross, target_sq=target_sq)):
        got = ops.subset_loss_spec(d(gram), d(ids), d(logits), keep, group, 5, spec, **{n: d(v) for n, v in kw.items()})
        want = reference.subset_loss_spec(gram, ids, logits, keep, group, 5, spec, **kw)
        assert got.dtype == torch.float64 and got.shape == (30, 5)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_sigmoid_ids_ranked_by_biased_score() -> None:
    """A bias that reorders the experts: logit order is rejected, biased order accepted."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])
    spec = RoutingSpec(scoring="sigmoid", top_k=1, renormalize=False).with_selection_bias(bias)
    gram = torch.ones(1, 3)
    keep = torch.tensor([[True, True, True, True], [False, True, True, True], [True, True, True, False]])
    tw = torch.zeros(1, 2)
    group = torch.zeros(1, dtype=torch.long)
    good = torch.tensor([[3, 0]], dtype=torch.int32)
    out = ops.subset_loss_spec(gram, good, logits, keep, group, 1, spec, target_weights=tw)
    # Keep all or drop 0: expert 3 (score sigmoid(-1)); drop 3: expert 0 (sigmoid(2)). Gram all ones.
    want = torch.tensor([[torch.sigmoid(torch.tensor(-1.0)) ** 2], [torch.sigmoid(torch.tensor(-1.0)) ** 2],
                         [torch.sigmoid(torch.tensor(2.0)) ** 2]], dtype=torch.float64)
    torch.testing.assert_close(out, want)
    ref = reference.subset_loss_spec(gram, good, logits, keep, group, 1, spec, target_weights=tw)
    torch.testing.assert_close(ref, want)
    bad = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="largest biased sigmoid score first"):
        ops.subset_loss_spec(gram, bad, logits, keep, group, 1, spec, target_weights=tw)
    with pytest.raises(ValueError, match="largest biased sigmoid score first"):
        reference.subset_loss_spec(gram, bad, logits, keep, group, 1, spec, target_weights=tw)


def test_grouped_spec_rejected() -> None:
    spec = RoutingSpec(scoring="sigmoid", top_k=2, n_group=4, topk_group=2)
    logits = torch.randn(5, 8)
    ids = reference.rank_spec(logits, spec)[:, :4].to(torch.int32)
    args = (torch.zeros(5, 10), ids, logits, torch.ones(1, 8, dtype=torch.bool), torch.zeros(5, dtype=torch.long), 1)
    with pytest.raises(RuntimeError, match="grouped routing .* not supported yet.*prefix"):
        ops.subset_loss_spec(*args, spec, target_weights=torch.zeros(5, 4))
    with pytest.raises(ValueError, match="grouped routing .* not supported yet"):
        reference.subset_loss_spec(*args, spec, target_weights=torch.zeros(5, 4))
    # All groups eligible (topk_group == n_group) is no group limit: accepted.
    flat = RoutingSpec(scoring="sigmoid", top_k=2, n_group=4, topk_group=4)
    flat_ids = reference.rank_spec(logits, flat)[:, :4].to(torch.int32)
    flat_args = (args[0], flat_ids, *args[2:])
    torch.testing.assert_close(
        ops.subset_loss_spec(*flat_args, flat, target_weights=torch.zeros(5, 4)),
        reference.subset_loss_spec(*flat_args, flat, target_weights=torch.zeros(5, 4)),
    )


def test_descriptor_checks() -> None:
    logits = torch.randn(5, 8)
    ids = reference.rank_experts(logits)[0][:, :4].to(torch.int32).contiguous()
    base = (torch.zeros(5, 10), ids, logits, torch.ones(1, 8, dtype=torch.bool), torch.zeros(5, dtype=torch.long), 1, 2)
    tw = torch.zeros(5, 4)
    op = torch.ops.moe_fast.subset_loss
    with pytest.raises(RuntimeError, match="subset_loss: scoring must be"):
        op(*base, True, tw, scoring="relu")
    with pytest.raises(RuntimeError, match="subset_loss: scaling must be"):
        op(*base, True, tw, scaling=0.0)
    with pytest.raises(RuntimeError, match="selection_bias and expert groups .* need scoring 'sigmoid'"):
        op(*base, True, tw, selection_bias=torch.zeros(8))
    with pytest.raises(RuntimeError, match=r"selection_bias must be \[E\]"):
        op(*base, True, tw, scoring="sigmoid", selection_bias=torch.zeros(7))
    with pytest.raises(RuntimeError, match="selection_bias must be finite"):
        op(*base, True, tw, scoring="sigmoid", selection_bias=torch.full((8,), math.inf))


def test_opcheck() -> None:
    gen = torch.Generator().manual_seed(5)
    spec = spec_of("sigmoid", 2, 8, True, 2.5, gen)
    logits, ids, gram, cross, target_sq, target_w = problem(spec, 20, 8, 4, gen)
    keep = random_candidates(8, 2, 4, 5, gen)
    group = torch.zeros(20, dtype=torch.long)
    args = ops.routing_op_args(spec)
    k, renorm = args.pop("k"), args.pop("renormalize")
    op = torch.ops.moe_fast.subset_loss.default
    torch.library.opcheck(op, (gram, ids, logits, keep, group, 1, k, renorm, target_w), args)
    torch.library.opcheck(op, (gram, ids, logits, keep, group, 1, k, renorm, None, cross, target_sq), args)
    topk = RoutingSpec(scoring="softmax_topk", top_k=2, renormalize=False)
    ids2 = reference.rank_spec(logits, topk)[:, :4].to(torch.int32)
    torch.library.opcheck(op, (gram, ids2, logits, keep, group, 1, 2, False, target_w), dict(scoring="softmax_topk"))
