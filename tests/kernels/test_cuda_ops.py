"""CUDA kernels of the moe_fast ops against moe_fast.reference and against the CPU kernels.

Runs wherever ``torch.cuda.is_available()``; on a machine without a GPU the whole module is skipped
(the one accepted skip). Exactness: ids, counts, offsets and perm bit for bit; weights to 1e-6;
Gram entries to float32 tolerance; subset losses to ~1e-12 relative, and bit-identical between runs.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import moe_fast
from moe_fast import ops, reference
from moe_fast.kernels.routing_spec import RoutingSpec
from helpers.logits import special_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EK = [(e, k) for e in (1, 2, 3, 8, 60, 64, 128, 256, 384, 512) for k in (1, 2, 4, 8) if k <= e]


def _assert_route_equal(got: ops.RouteResult, want: ops.RouteResult, what: str) -> None:
    for name in ("ids", "counts", "offsets", "perm"):
        g, w = getattr(got, name).cpu(), getattr(want, name).cpu()
        assert g.dtype == w.dtype == torch.int32, f"{what}: {name} dtype"
        assert torch.equal(g, w), f"{what}: {name} differs"
    torch.testing.assert_close(got.weights.cpu(), want.weights.cpu(), atol=1e-6, rtol=1e-6, msg=what)


def test_cuda_kernels_are_registered() -> None:
    assert moe_fast.kernels.extension.HAS_CUDA_KERNELS, (
        "a CUDA device is present but moe_fast._C has no CUDA kernels: rebuild with "
        "MOE_FAST_CUDA=1 pip install --no-build-isolation -e ."
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,k", EK)
def test_route_matches_reference_and_cpu(E: int, k: int, dtype: torch.dtype) -> None:
    for T in (0, 1, 7, 4096):
        for ties in (False, True):
            x = special_logits(T, E, dtype, ties)
            xc = x.cuda()
            betas = [None, 0.3, 1.0] + ([[0.9] + [0.1] * (k - 2)] if k > 2 else [])
            for beta in betas:
                for renorm in (True, False):
                    what = f"T={T} E={E} k={k} {dtype} ties={ties} beta={beta} renorm={renorm}"
                    got = ops.route(xc, k, renorm, beta)
                    assert got.ids.is_cuda and got.perm.is_cuda
                    _assert_route_equal(got, reference.route(x, k, renorm, beta), what + " vs reference")
                    _assert_route_equal(got, ops.route(x, k, renorm, beta), what + " vs cpu")


@pytest.mark.parametrize("E,k", [(1, 1), (3, 2), (8, 2), (60, 4), (64, 2), (128, 8), (256, 8), (384, 8), (512, 8)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_route_keep_mask(E: int, k: int, dtype: torch.dtype) -> None:
    for trial in range(4):
        keep = torch.zeros(E, dtype=torch.bool)
        keep[torch.randperm(E)[: max(k, E - trial * (E // 4) - 1)]] = True
        x = special_logits(513, E, dtype)
        for beta in (None, 0.5):
            for renorm in (True, False):
                got = ops.route(x.cuda(), k, renorm, beta, keep.cuda())
                what = f"E={E} k={k} keep={keep.sum().item()} beta={beta} renorm={renorm}"
                _assert_route_equal(got, reference.route(x, k, renorm, beta, keep), what + " vs reference")
                _assert_route_equal(got, ops.route(x, k, renorm, beta, keep), what + " vs cpu")
                assert not torch.isin(got.ids.cpu(), torch.nonzero(~keep).flatten().int()).any()


def test_route_large_and_deterministic() -> None:
    x = torch.randn(65536, 64, dtype=torch.bfloat16, device="cuda")
    a = ops.route(x, 4, True, 0.2)
    b = ops.route(x, 4, True, 0.2)
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    _assert_route_equal(a, reference.route(x.cpu(), 4, True, 0.2), "T=65536 E=64 k=4")


def test_route_bad_input_on_cuda() -> None:
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match="k must be in"):
        ops.route(x, 9)
    with pytest.raises(RuntimeError, match="must be on"):
        ops.route(x, 2, keep=torch.ones(8, dtype=torch.bool))


def _gram_f64(y: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.expert_gram's packing, computed in float64."""
    yd = y.double()
    rows, cols = reference.triu_pairs(y.shape[1])
    gram = torch.bmm(yd, yd.transpose(1, 2))[:, rows, cols]
    if z is None:
        return gram, yd.new_empty(y.shape[0], 0), yd.new_empty(0)
    zd = z.double()
    return gram, torch.einsum("tmh,th->tm", yd, zd), (zd * zd).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,M,H", [(0, 4, 16), (1, 1, 1), (7, 3, 33), (64, 8, 4096), (5, 17, 100)])
def test_expert_gram(T: int, M: int, H: int, dtype: torch.dtype) -> None:
    y = torch.randn(T, M, H).to(dtype)
    z = torch.randn(T, H).to(dtype)
    for target in (None, z):
        got = ops.expert_gram(y.cuda(), None if target is None else target.cuda())
        want = _gram_f64(y, target)
        cpu = ops.expert_gram(y, target)
        atol = 1e-4 * max(H, 1) ** 0.5  # float32 sums of H products of N(0, 1) values
        for g, w, c, name in zip(got, want, cpu, ("gram", "cross", "target_sq")):
            assert g.is_cuda and g.dtype == torch.float32 and g.shape == w.shape, name
            torch.testing.assert_close(g.cpu().double(), w, atol=atol, rtol=1e-5, msg=name)
            torch.testing.assert_close(g.cpu(), c, atol=atol, rtol=1e-5, msg=name + " vs cpu")


def _subset_problem(T: int, E: int, k: int, M: int, H: int = 32, progressive: bool = False):
    """A consistent calibration problem: ranked ids, Gram, targets; logits with special rows."""
    logits = special_logits(T, E, torch.float32)
    ids = reference.route(logits, M).ids
    y = torch.randn(T, M, H)
    gram, cross, target_sq = reference.expert_gram(y, torch.randn(T, H) if progressive else None)
    tw = torch.zeros(T, M)
    tw[:, :k] = reference.route(logits, k).weights
    extra = dict(cross=cross, target_sq=target_sq) if progressive else dict(target_weights=tw)
    return gram, ids, logits, extra


def _candidates(E: int, drop: int, limit: int = 70) -> torch.Tensor:
    rows = []
    for dropped in itertools.islice(itertools.combinations(range(E), drop), limit):
        keep = torch.ones(E, dtype=torch.bool)
        keep[list(dropped)] = False
        rows.append(keep)
    return torch.stack(rows)


def _close_f64(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.float64 and got.shape == want.shape, what
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max().clamp(min=1.0)), msg=what)


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("E,k,drop", [(8, 2, 2), (8, 2, 4), (8, 1, 3), (64, 2, 1), (60, 4, 2), (256, 8, 1), (512, 8, 3)])
def test_subset_loss(E: int, k: int, drop: int, renorm: bool, progressive: bool) -> None:
    M = k + drop
    for T, G in ((0, 3), (1, 1), (7, 3), (9000, 5)):
        gram, ids, logits, extra = _subset_problem(T, E, k, M, progressive=progressive)
        keep = _candidates(E, drop, limit=70 if E <= 8 else 12)
        group = torch.randint(0, G, (T,))  # arbitrary order, possibly empty groups
        if T >= 7:
            group[: T // 2] = G - 1  # one group larger than a chunk when T is large
        args = (gram, ids, logits, keep, group, G, k, renorm)
        dev = {n: v.cuda() for n, v in extra.items()}
        got = ops.subset_loss(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), **dev)
        again = ops.subset_loss(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), **dev)
        assert got.is_cuda
        assert torch.equal(got, again), "not deterministic"
        what = f"T={T} E={E} k={k} drop={drop} renorm={renorm} progressive={progressive}"
        _close_f64(got.cpu(), reference.subset_loss(*args, **extra), what + " vs reference")
        _close_f64(got.cpu(), ops.subset_loss(*args, **extra), what + " vs cpu")


def test_subset_loss_bad_input_on_cuda() -> None:
    gram, ids, logits, extra = _subset_problem(16, 8, 2, 4)
    keep = _candidates(8, 2).cuda()
    dev = [gram.cuda(), ids.cuda(), logits.cuda(), keep]
    tw = extra["target_weights"].cuda()
    with pytest.raises(RuntimeError, match="group ids must lie"):
        ops.subset_loss(*dev, torch.full((16,), 3, device="cuda"), 3, 2, target_weights=tw)
    with pytest.raises(RuntimeError, match="group ids must lie"):
        ops.subset_loss(*dev, torch.full((16,), -1, device="cuda"), 3, 2, target_weights=tw)
    with pytest.raises(RuntimeError, match="drops"):
        ops.subset_loss(*dev[:3], _candidates(8, 3).cuda(), torch.zeros(16, dtype=torch.long, device="cuda"), 1, 2,
                        target_weights=tw)



def _route_specs(E: int, k: int) -> list[RoutingSpec]:
    """Every scoring; sigmoid with a bias, scaling and groups where E splits into 8 or 2, and E
    groups of one with one eligible (k - 1 slots filled from the ineligible groups, by index)."""
    bias = torch.randn(E) * 0.3
    out = [RoutingSpec("softmax", k, False, scaling=2.5), RoutingSpec("softmax_topk", k, False),
           RoutingSpec("sigmoid", k, True), RoutingSpec("sigmoid", k, False, 2.5, bias)]
    for groups, topk_group in ((8, 4), (2, 1), (E, 1)):
        if E % groups == 0 and topk_group < groups:
            out.append(RoutingSpec("sigmoid", k, True, 2.5, bias, groups, topk_group))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (60, 4), (256, 8), (384, 8), (512, 8)])
def test_route_spec_matches_reference_and_cpu(E: int, k: int, dtype: torch.dtype) -> None:
    # The general kernel (route_spec.cu): the CPU's ids and plan bit for bit (its sigmoid is CUDA's
    # expf; these inputs hold no two scores an ulp apart at a decision), weights to 1e-6.
    keep = torch.arange(E) % 5 != 3 if E >= 2 * k + 2 else None
    for T in (0, 7, 700):
        for ties in (False, True):
            x = special_logits(T, E, dtype, ties)
            for spec in _route_specs(E, k):
                for beta in (None, 0.4):
                    for mask in (None, keep):
                        what = f"{spec.scoring} groups={spec.n_group}/{spec.topk_group} T={T} ties={ties} beta={beta}"
                        got = ops.route_spec(x.cuda(), spec, beta, None if mask is None else mask.cuda())
                        _assert_route_equal(got, reference.route_spec(x, spec, beta, mask), what + " vs reference")
                        _assert_route_equal(got, ops.route_spec(x, spec, beta, mask), what + " vs cpu")


def test_route_spec_bias_checked_on_device_without_sync() -> None:
    x = torch.randn(4096, 256, device="cuda")
    spec = RoutingSpec("sigmoid", 8, True, 2.5, (torch.randn(256) * 0.1).cuda(), 8, 4)
    ops.route_spec(x, spec)  # warm-up
    assert _count_syncs(lambda: ops.route_spec(x, spec, 0.3)) == 0
    # A non-finite bias on the GPU is caught on the device (it ends the CUDA context: own process).
    code = textwrap.dedent(
        """
        import torch, moe_fast
        from moe_fast import ops
        from moe_fast.kernels.routing_spec import RoutingSpec
        spec = RoutingSpec("sigmoid", 2, True, selection_bias=torch.full((8,), float("inf"), device="cuda"))
        ops.route_spec(torch.randn(4, 8, device="cuda"), spec)
        torch.cuda.synchronize()
        print("NO ERROR")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "assert" in proc.stderr.lower(), proc.stderr[-2000:]

def _count_syncs(fn) -> int:
    """Host synchronizations fn() makes, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_host_synchronizations_per_call() -> None:
    # Before: subset_loss synchronized 5 times per call (keep.cpu(), the target check's .item(),
    # the ids min/max, searchsorted().cpu(), the blocking table copy) and route with keep once
    # (keep.sum().item()). Now: none with keep and group on the host (as the search passes them),
    # one for each given on the GPU; none for route.
    gram, ids, logits, extra = _subset_problem(4096, 8, 2, 4)
    keep, group = _candidates(8, 2), torch.arange(4096) % 3
    dev = [gram.cuda(), ids.cuda(), logits.cuda()]
    tw = extra["target_weights"].cuda()
    call = lambda kp, gp: ops.subset_loss(*dev, kp, gp, 3, 2, target_weights=tw)  # noqa: E731
    keep_dev, group_dev = keep.cuda(), group.cuda()
    call(keep, group)  # warm-up: pinned-memory pool, cub temp sizes
    assert _count_syncs(lambda: call(keep, group)) == 0
    assert _count_syncs(lambda: call(keep_dev, group)) == 1
    assert _count_syncs(lambda: call(keep, group_dev)) == 1
    torch.testing.assert_close(call(keep, group).cpu(), call(keep_dev, group_dev).cpu(), rtol=0, atol=0)
    x, mask = torch.randn(4096, 8, device="cuda"), torch.ones(8, dtype=torch.bool, device="cuda")
    assert _count_syncs(lambda: ops.route(x, 2, True, 0.3, mask)) == 0
    y = torch.randn(64, 4, 32, device="cuda")
    assert _count_syncs(lambda: ops.expert_gram(y)) == 0


def test_gram_with_target_and_zero_hidden_on_cuda() -> None:
    got = ops.expert_gram(torch.randn(3, 2, 0, device="cuda"), torch.randn(3, 0, device="cuda"))
    for g, shape in zip(got, ((3, 3), (3, 2), (3,))):
        assert torch.equal(g.cpu(), torch.zeros(shape)), g


@pytest.mark.parametrize("case", ["out_of_range", "unranked", "routing_target", "keep_too_small"])
def test_device_side_checks(case: str) -> None:
    # Checks that run on the device end the CUDA context when they fire: one process per case.
    code = textwrap.dedent(f"""
        import torch, moe_fast
        from moe_fast import ops, reference
        case = {case!r}
        logits = torch.randn(16, 8)
        ids = reference.route(logits, 4).ids
        tw = torch.zeros(16, 4); tw[:, :2] = reference.route(logits, 2).weights
        gram = torch.randn(16, 10)
        keep = torch.ones(2, 8, dtype=torch.bool); keep[1, :2] = False
        if case == "out_of_range":
            ids[3, 1] = 8
        elif case == "unranked":
            ids[3] = ids[3].flip(0)
        elif case == "routing_target":
            tw[5] = 0.25
        if case == "keep_too_small":
            ops.route(logits.cuda(), 2, keep=torch.tensor([True] + [False] * 7, device="cuda"))
        else:
            ops.subset_loss(gram.cuda(), ids.cuda(), logits.cuda(), keep, torch.zeros(16, dtype=torch.long), 1, 2,
                            target_weights=tw.cuda())
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout, proc.stdout + proc.stderr
    assert "assert" in proc.stderr.lower(), proc.stderr[-2000:]
