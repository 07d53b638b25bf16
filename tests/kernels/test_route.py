"""moe_fast.ops.route against moe_fast.reference.route, plus invariants and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from moe_fast import ops, reference
from helpers.logits import special_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EK = [(e, k) for e in (1, 2, 3, 8, 60, 64, 128, 256, 384, 512) for k in (1, 2, 4, 8) if k <= e]


def assert_route_equal(got: ops.RouteResult, want: ops.RouteResult) -> None:
    assert torch.equal(got.ids.cpu(), want.ids), "ids differ"
    torch.testing.assert_close(got.weights.cpu(), want.weights, atol=1e-6, rtol=1e-5)
    assert torch.equal(got.counts.cpu(), want.counts), "counts differ"
    assert torch.equal(got.offsets.cpu(), want.offsets), "offsets differ"
    assert torch.equal(got.perm.cpu(), want.perm), "perm differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,k", EK)
def test_route_matches_reference(E: int, k: int, dtype: torch.dtype, device: str) -> None:
    for T in (0, 1, 7, 4096 if E <= 64 else 513):
        for ties in (False, True):
            x = special_logits(T, E, dtype, ties, device=device)
            betas = [None, 0.3] + ([[0.9] + [0.1] * (k - 2)] if k > 2 else [])
            for beta in betas:
                for renorm in (True, False):
                    assert_route_equal(
                        ops.route(x, k, renorm, beta), reference.route(x.cpu(), k, renorm, beta)
                    )


@pytest.mark.parametrize("E,k", [(8, 2), (64, 2), (60, 4), (256, 8), (3, 2)])
def test_route_with_keep_mask(E: int, k: int, device: str) -> None:
    for trial in range(4):
        keep = torch.zeros(E, dtype=torch.bool)
        keep[torch.randperm(E)[: max(k, E - trial * (E // 4) - 1)]] = True
        x = special_logits(300, E, torch.float32, device=device)
        for beta in (None, 0.5):
            got = ops.route(x, k, True, beta, keep.to(device))
            want = reference.route(x.cpu(), k, True, beta, keep)
            assert_route_equal(got, want)
            chosen = got.ids[got.ids < E].long().cpu()
            assert keep[chosen].all(), "a masked expert was chosen"


def test_route_outputs_are_valid_on_special_rows(device: str) -> None:
    E, k = 8, 4
    x = special_logits(7, E, torch.float32, device=device)
    r = ops.route(x, k, True)
    assert torch.isfinite(r.weights).all()
    for row in r.ids.cpu().tolist():
        assert len(set(row)) == k and all(0 <= e < E for e in row)
    # All -inf / all NaN / all equal rows: the k lowest experts, equal weights.
    for t in (0, 1, 2):
        assert r.ids[t].cpu().tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(r.weights[t].cpu(), torch.full((k,), 0.25))


def test_route_skip_rule_by_hand() -> None:
    # Slot 1 is skipped when w1 / w0 = exp(l1 - l0) < beta, i.e. l0 - l1 > -log(beta) = 0.6 here.
    x = torch.tensor([[1.0, 0.5, -5.0], [1.0, 0.25, -5.0], [2.0, 2.0, -5.0]])
    r = ops.route(x, 2, True, math.exp(-0.6))
    assert r.ids.tolist() == [[0, 1], [0, 3], [0, 1]]
    assert r.weights[1].tolist() == [1.0, 0.0]
    torch.testing.assert_close(r.weights[0], torch.softmax(torch.tensor([1.0, 0.5]), 0))
    # Skipped slots come after every expert in the plan.
    assert r.counts.tolist() == [3, 2, 0] and r.offsets.tolist() == [0, 3, 5, 5] and r.perm.tolist()[-1] == 3
    # beta = 0 never skips; beta = 1 skips every strictly smaller second weight, never a tie.
    assert (ops.route(x, 2, True, 0.0).ids < 3).all()
    assert ops.route(x, 2, True, 1.0).ids[:, 1].tolist() == [3, 3, 1]


def test_route_not_renormalized_keeps_topk_mass() -> None:
    x = torch.randn(100, 16)
    p = torch.softmax(x, -1)
    r = ops.route(x, 2, False)
    torch.testing.assert_close(r.weights, torch.topk(p, 2).values)
    rs = ops.route(x, 2, False, 0.6)
    torch.testing.assert_close(rs.weights.sum(-1), torch.topk(p, 2).values.sum(-1))


def test_plan_invariants(device: str) -> None:
    E, k, T = 60, 4, 3000
    r = ops.route(torch.randn(T, E, device=device), k, True, 0.2)
    ids, perm, off = r.ids.reshape(-1).cpu(), r.perm.cpu().long(), r.offsets.cpu()
    assert sorted(perm.tolist()) == list(range(T * k))
    for e in range(E):
        slots = perm[off[e] : off[e + 1]]
        assert (ids[slots] == e).all() and (slots.diff() > 0).all()
    assert (ids[perm[off[E] :]] == E).all()
    assert int(r.counts.sum()) == int(off[E]) == int((ids < E).sum())


def test_route_same_for_any_thread_count() -> None:
    x = torch.randn(70000, 64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.route(x, 2, True, 0.4)
        torch.set_num_threads(max(2, old))
        many = ops.route(x, 2, True, 0.4)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ops.route(torch.randn(4, 8).double(), 2), "float32, bfloat16 or float16"),
        (lambda: ops.route(torch.randn(4, 8, 2), 2), r"\[T, E\]"),
        (lambda: ops.route(torch.randn(4, 8), 9), "k must be in 1..8"),
        (lambda: ops.route(torch.randn(4, 3), 4), "must not exceed the number of experts"),
        (lambda: ops.route(torch.randn(4, 600), 2), "E must be in 1..512"),
        (lambda: ops.route(torch.randn(8, 4).t(), 2), "contiguous"),
        (lambda: ops.route(torch.randn(4, 8), 2, True, 1.5), r"beta must lie in \[0, 1\]"),
        (lambda: ops.route(torch.randn(4, 8), 2, True, -0.1), r"beta must lie in \[0, 1\]"),
        (lambda: ops.route(torch.randn(4, 8), 4, True, [0.1, 0.2]), "one value or k - 1"),
        (lambda: ops.route(torch.randn(4, 8), 2, True, None, torch.ones(7, dtype=torch.bool)), "one entry per expert"),
        (lambda: ops.route(torch.randn(4, 8), 2, True, None, torch.ones(8)), "keep must be Bool"),
        (lambda: ops.route(torch.randn(4, 8), 3, True, None, torch.arange(8) < 2), "fewer than k"),
        (lambda: ops.route(torch.randn(4, 8, device="meta"), 2, True, None, torch.ones(8, dtype=torch.bool)), "must be on"),
    ],
)
def test_route_bad_input(make, match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        make()


def test_route_opcheck() -> None:
    for args in [
        (torch.randn(33, 8), 2, True, None, None),
        (torch.randn(33, 60).bfloat16(), 4, False, [0.3, 0.2, 0.1], None),
        (torch.randn(5, 8).half(), 2, True, [0.5], torch.arange(8) % 3 != 0),
        (torch.randn(0, 8), 2, True, None, None),
    ]:
        torch.library.opcheck(torch.ops.moe_fast.route.default, args)


def test_route_traces_under_torch_compile() -> None:
    def moe_route(h: torch.Tensor, w: torch.Tensor):
        r = ops.route(h @ w.t(), 2, True, 0.3)
        return r.weights * 2, r.perm

    h, w = torch.randn(64, 16), torch.randn(8, 16)
    compiled = torch.compile(moe_route, fullgraph=True, backend="aot_eager")
    got, want = compiled(h, w), moe_route(h, w)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_route_weights_are_detached() -> None:
    # route is not differentiable: nothing may claim a gradient it cannot give.
    logits = torch.randn(6, 8, requires_grad=True)
    r = ops.route(logits, 2, True, 0.3)
    assert not any(t.requires_grad for t in r), [t.requires_grad for t in r]
    assert r.weights.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        r.weights.sum().backward()
    # The same numbers as without grad.
    assert torch.equal(r.weights, ops.route(logits.detach(), 2, True, 0.3).weights)
