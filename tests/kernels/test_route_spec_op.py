"""moe_fast.ops.route_spec (the route op with a routing descriptor) against reference.route_spec."""

from __future__ import annotations

import math

import pytest
import torch

from moe_fast import ops, reference
from moe_fast.kernels.routing_spec import RoutingSpec, softmax_routing
from helpers.logits import special_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bias_for(E: int, ties: bool) -> torch.Tensor:
    """A selection bias large enough to change choices (DeepSeek's are of the scores' order)."""
    return (torch.randint(-2, 3, (E,)).float() * 0.25) if ties else torch.randn(E) * 0.3


def specs(E: int, k: int, ties: bool = False) -> list[RoutingSpec]:
    """Every scoring, with and without renormalizing, scaling, a selection bias and groups."""
    out = [
        RoutingSpec("softmax", k, True, scaling=2.5),
        RoutingSpec("softmax", k, False, scaling=0.7),
        RoutingSpec("softmax_topk", k, False, router_bias=True),
        RoutingSpec("softmax_topk", k, True, scaling=1.5),
        RoutingSpec("sigmoid", k, True),
        RoutingSpec("sigmoid", k, False, scaling=2.5),
        RoutingSpec("sigmoid", k, True, scaling=2.5, selection_bias=bias_for(E, ties)),
        RoutingSpec("sigmoid", k, False, selection_bias=bias_for(E, ties)),
    ]
    for groups, topk_group in ((2, 1), (4, 2), (8, 4), (8, 3)):
        if E % groups == 0 and topk_group * (E // groups) >= k:
            out.append(RoutingSpec("sigmoid", k, True, 2.5, bias_for(E, ties), groups, topk_group))
            out.append(RoutingSpec("sigmoid", k, False, 1.0, None, groups, topk_group))
    return out


def assert_same_routing(got: ops.RouteResult, want: ops.RouteResult, what: str = "") -> None:
    assert torch.equal(got.ids.cpu(), want.ids), f"ids differ {what}"
    torch.testing.assert_close(got.weights.cpu(), want.weights, atol=1e-6, rtol=1e-5, msg=lambda m: f"{what}: {m}")
    assert torch.equal(got.counts.cpu(), want.counts), f"counts differ {what}"
    assert torch.equal(got.offsets.cpu(), want.offsets), f"offsets differ {what}"
    assert torch.equal(got.perm.cpu(), want.perm), f"perm differs {what}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,k", [(1, 1), (4, 2), (8, 2), (12, 3), (64, 6), (256, 8), (384, 8), (512, 8)])
def test_route_spec_matches_reference(E: int, k: int, dtype: torch.dtype) -> None:
    for T in (0, 1, 7, 300 if E < 256 else 97):
        for ties in (False, True):
            x = special_logits(T, E, dtype, ties)
            betas = [None, 0.3, 1.0] + ([[0.9] + [0.1] * (k - 2)] if k > 2 else [])
            for spec in specs(E, k, ties):
                for beta in betas:
                    what = f"T={T} ties={ties} {spec.scoring} renorm={spec.renormalize} groups={spec.n_group}/{spec.topk_group} beta={beta}"
                    assert_same_routing(ops.route_spec(x, spec, beta), reference.route_spec(x, spec, beta), what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deepseek_v3_shaped_routing(dtype: torch.dtype) -> None:
    # 256 experts in 8 groups, 4 groups eligible, top-8, a per-layer bias, routed_scaling_factor 2.5.
    E, k = 256, 8
    bias = torch.randn(E) * 0.05
    for renormalize in (True, False):
        spec = RoutingSpec("sigmoid", k, renormalize, 2.5, bias, 8, 4)
        x = torch.randn(2048, E).to(dtype)
        for beta in (None, 0.5, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]):
            assert_same_routing(ops.route_spec(x, spec, beta), reference.route_spec(x, spec, beta), f"beta={beta}")
        # Only experts of at most 4 groups are chosen per token.
        ids = ops.route_spec(x, spec).ids.long()
        assert int(max(len(set(row)) for row in (ids // 32).tolist())) <= 4


@pytest.mark.parametrize("E,k,groups,topk_group", [(8, 2, 2, 1), (60, 4, 6, 3), (256, 8, 8, 4)])
def test_route_spec_with_keep_mask(E: int, k: int, groups: int, topk_group: int) -> None:
    size = E // groups
    masks = []
    for trial in range(3):  # random masks that allow at least k
        keep = torch.zeros(E, dtype=torch.bool)
        keep[torch.randperm(E)[: max(k, E - trial * (E // 3) - 1)]] = True
        masks.append(keep)
    whole_group = torch.ones(E, dtype=torch.bool)
    whole_group[:size] = False  # group 0 dropped entirely: never eligible
    lone = torch.ones(E, dtype=torch.bool)
    lone[size + 1 : 2 * size] = False  # group 1 keeps one expert: it scores alone
    masks += [whole_group, lone]
    for keep in masks:
        for ties in (False, True):
            x = special_logits(300, E, torch.float32, ties)
            for spec in specs(E, k, ties) + [RoutingSpec("sigmoid", k, True, 2.0, bias_for(E, ties), groups, topk_group)]:
                for beta in (None, 0.5):
                    got = ops.route_spec(x, spec, beta, keep)
                    assert_same_routing(got, reference.route_spec(x, spec, beta, keep), f"{spec.scoring} beta={beta}")
                    assert keep[got.ids[got.ids < E].long()].all(), "a masked expert was chosen"


def test_grouped_routing_by_hand() -> None:
    # E=4 in 2 groups {0,1} {2,3}, one eligible group, k=1. Scores s = sigmoid(l).
    x = torch.tensor([[2.0, -3.0, 1.0, 1.0]])
    spec = RoutingSpec("sigmoid", 1, True, n_group=2, topk_group=1)
    # Group scores: s0 + s1 = 0.881 + 0.047 < s2 + s3 = 2 * 0.731: group 1 wins, so expert 2 (tie
    # with 3 goes to the lower index) although expert 0 has the best score.
    r = ops.route_spec(x, spec)
    assert r.ids.tolist() == [[2]] and r.weights.tolist() == [[1.0]]
    # Without groups expert 0 wins; a bias on expert 3 picks it, weighted by its unbiased score.
    assert ops.route_spec(x, RoutingSpec("sigmoid", 1, False)).ids.tolist() == [[0]]
    biased = RoutingSpec("sigmoid", 1, False, 2.0, torch.tensor([0.0, 0.0, 0.0, 0.5]), 2, 1)
    r = ops.route_spec(x, biased)
    assert r.ids.tolist() == [[3]]
    torch.testing.assert_close(r.weights, 2.0 * torch.sigmoid(torch.tensor([[1.0]])))


def test_sigmoid_skip_rule_on_final_weights() -> None:
    # w_1 / w_0 = s_1 / s_0; beta just above the ratio skips slot 1, just below keeps it.
    x = torch.tensor([[1.0, 0.0, -4.0]])
    s = torch.sigmoid(x[0])
    ratio = float(s[1] / s[0])
    spec = RoutingSpec("sigmoid", 2, True, scaling=3.0)
    assert ops.route_spec(x, spec, ratio * 1.001).ids.tolist() == [[0, 3]]
    assert ops.route_spec(x, spec, ratio * 0.999).ids.tolist() == [[0, 1]]
    torch.testing.assert_close(ops.route_spec(x, spec, ratio * 1.001).weights, torch.tensor([[3.0, 0.0]]))
    # beta = 1 never skips a tie; beta = 0 never skips.
    tie = torch.tensor([[0.5, 0.5, -1.0]])
    assert ops.route_spec(tie, spec, 1.0).ids.tolist() == [[0, 1]]
    assert ops.route_spec(x, spec, 0.0).ids.tolist() == [[0, 1]]


@pytest.mark.parametrize("E,k", [(8, 2), (60, 4), (256, 8)])
def test_plain_softmax_is_todays_route(E: int, k: int) -> None:
    # A plain softmax descriptor takes the long-standing kernel: bit for bit today's op.
    x = special_logits(500, E, torch.float32)
    keep = torch.arange(E) % 3 != 1 if E > 2 * k else None
    for renormalize in (True, False):
        for beta in (None, 0.4):
            old = ops.route(x, k, renormalize, beta, keep)
            new = ops.route_spec(x, softmax_routing(k, renormalize), beta, keep)
            explicit = torch.ops.moe_fast.route(x, k, renormalize, reference.beta_values(beta), keep, "softmax", None, 1, 1, 1.0)
            for a, b, c in zip(old, new, explicit):
                assert torch.equal(a, b) and torch.equal(a, c)
            assert_same_routing(new, reference.route(x, k, renormalize, beta, keep))


def test_softmax_scaling_equals_scaled_route() -> None:
    # The general kernel's softmax (scaling 2: exact) routes as today's kernel, weights times 2.
    x = special_logits(400, 64, torch.float32)
    for renormalize in (True, False):
        for beta in (None, 0.3):
            plain = ops.route(x, 4, renormalize, beta)
            scaled = ops.route_spec(x, RoutingSpec("softmax", 4, renormalize, scaling=2.0), beta)
            assert torch.equal(plain.ids, scaled.ids) and torch.equal(plain.perm, scaled.perm)
            torch.testing.assert_close(scaled.weights, 2.0 * plain.weights, atol=0, rtol=1e-6)


def test_route_spec_same_for_any_thread_count() -> None:
    x = torch.randn(20000, 256)
    spec = RoutingSpec("sigmoid", 8, True, 2.5, torch.randn(256) * 0.1, 8, 4)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.route_spec(x, spec, 0.3)
        torch.set_num_threads(max(2, old))
        many = ops.route_spec(x, spec, 0.3)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def _route(x: torch.Tensor, k: int = 2, **kw):
    return torch.ops.moe_fast.route(x, k, True, None, None, **kw)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _route(torch.randn(4, 8), scoring="tanh"), "scoring must be 'softmax', 'sigmoid' or 'softmax_topk'"),
        (lambda: _route(torch.randn(4, 8), scoring="sigmoid", selection_bias=torch.zeros(7)), r"selection_bias must be \[E\] = \[8\]"),
        (lambda: _route(torch.randn(4, 8), scoring="sigmoid", selection_bias=torch.zeros(8).double()), "selection_bias must be Float"),
        (lambda: _route(torch.randn(4, 8), scoring="sigmoid", selection_bias=torch.zeros(8, 1)), "selection_bias must have 1 dimensions"),
        (lambda: _route(torch.randn(4, 8), scoring="sigmoid", selection_bias=torch.tensor([math.nan] + [0.0] * 7)), "selection_bias must be finite"),
        (lambda: _route(torch.randn(4, 8), scoring="sigmoid", n_group=3, topk_group=1), r"n_group \(3\) must divide the number of experts E \(8\)"),
        (lambda: _route(torch.randn(4, 8), scoring="sigmoid", n_group=4, topk_group=5), "1 <= topk_group <= n_group"),
        (lambda: _route(torch.randn(4, 8), scoring="sigmoid", n_group=4, topk_group=0), "1 <= topk_group <= n_group"),
        (lambda: _route(torch.randn(4, 8), scaling=0.0), "scaling must be a finite number > 0"),
        (lambda: _route(torch.randn(4, 8), scaling=math.inf), "scaling must be a finite number > 0"),
        (lambda: _route(torch.randn(4, 8), scoring="softmax", selection_bias=torch.zeros(8)), "need scoring 'sigmoid'"),
        (lambda: _route(torch.randn(4, 8), scoring="softmax_topk", n_group=2, topk_group=1), "need scoring 'sigmoid'"),
        (lambda: _route(torch.randn(4, 8, device="meta"), scoring="sigmoid", selection_bias=torch.zeros(8)), "must be on"),
    ],
)
def test_route_spec_bad_input(make, match: str) -> None:
    with pytest.raises(RuntimeError, match=match):
        make()


def test_route_spec_opcheck() -> None:
    bias = torch.randn(16) * 0.1
    for args, kwargs in [
        ((torch.randn(33, 16), 2, True, None, None), dict(scoring="sigmoid", selection_bias=bias, n_group=4, topk_group=2, scaling=2.5)),
        ((torch.randn(33, 16).bfloat16(), 4, False, [0.3, 0.2, 0.1], None), dict(scoring="sigmoid", n_group=2, topk_group=1)),
        ((torch.randn(5, 16).half(), 2, True, [0.5], torch.arange(16) % 3 != 0), dict(scoring="softmax_topk")),
        ((torch.randn(9, 16), 3, False, None, None), dict(scoring="softmax", scaling=1.5)),
        ((torch.randn(0, 16), 2, True, None, None), dict(scoring="sigmoid", selection_bias=bias)),
    ]:
        torch.library.opcheck(torch.ops.moe_fast.route.default, args, kwargs)


def test_route_spec_traces_under_torch_compile() -> None:
    spec = RoutingSpec("sigmoid", 2, True, 2.5, torch.randn(8) * 0.1, 4, 2)

    def moe_route(h: torch.Tensor, w: torch.Tensor):
        r = ops.route_spec(h @ w.t(), spec, 0.3)
        return r.weights * 2, r.perm

    h, w = torch.randn(64, 16), torch.randn(8, 16)
    compiled = torch.compile(moe_route, fullgraph=True, backend="aot_eager")
    got, want = compiled(h, w), moe_route(h, w)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_routing_op_args_carry_every_field() -> None:
    bias = torch.randn(8, dtype=torch.float64)
    args = ops.routing_op_args(RoutingSpec("sigmoid", 3, False, 2.5, bias, 4, 2), "cpu")
    assert {k: v for k, v in args.items() if k != "selection_bias"} == dict(
        k=3, renormalize=False, scoring="sigmoid", n_group=4, topk_group=2, scaling=2.5
    )
    assert args["selection_bias"].dtype == torch.float32 and torch.equal(args["selection_bias"], bias.float())
    assert ops.routing_op_args(softmax_routing(2, True))["selection_bias"] is None
