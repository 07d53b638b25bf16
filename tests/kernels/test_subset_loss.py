"""moe_fast.ops.expert_gram and subset_loss against moe_fast.reference and the paper's way."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moe_fast import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,M,H", [(0, 4, 16), (1, 1, 1), (7, 3, 33), (300, 6, 64), (64, 10, 7)])
def test_gram_matches_reference(T: int, M: int, H: int, dtype: torch.dtype, device: str) -> None:
    y = torch.randn(T, M, H).to(dtype)
    z = torch.randn(T, H).to(dtype)
    for target in (None, z):
        got = ops.expert_gram(y.to(device), None if target is None else target.to(device))
        want = reference.expert_gram(y, target)
        for g, w in zip(got, want):
            assert g.dtype == torch.float32 and g.shape == w.shape
            torch.testing.assert_close(g.cpu(), w, atol=1e-4 * max(H, 1) ** 0.5, rtol=1e-5)


def test_gram_packing_order() -> None:
    y = torch.randn(2, 3, 5)
    g, _, _ = ops.expert_gram(y)
    pairs = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    want = torch.stack([(y[:, i] * y[:, j]).sum(-1) for i, j in pairs], dim=1)
    torch.testing.assert_close(g, want)


def random_candidates(E: int, max_drop: int, C: int, gen: torch.Generator) -> torch.Tensor:
    keep = torch.ones(C, E, dtype=torch.bool)
    for c in range(C):
        n = int(torch.randint(0, max_drop + 1, (1,), generator=gen))
        keep[c, torch.randperm(E, generator=gen)[:n]] = False
    return keep


def make_problem(T: int, E: int, k: int, M: int, special: bool, gen: torch.Generator):
    logits = torch.randn(T, E, generator=gen) * 2
    if special and T >= 4:
        logits[0] = -math.inf
        logits[1, : E // 2] = math.nan
        logits[2, 0] = math.inf
        logits[3] = 0.25
    ids = reference.route(logits, M).ids
    y = torch.randn(T, M, 8, generator=gen)
    gram, cross, target_sq = reference.expert_gram(y, torch.randn(T, 8, generator=gen))
    target_w = torch.zeros(T, M)
    target_w[:, :k] = reference.route(logits, k).weights
    return reference.sanitize_logits(logits), ids, gram, cross, target_sq, target_w


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("E,k,M", [(8, 2, 4), (8, 2, 8), (8, 1, 3), (60, 4, 6), (64, 2, 4), (128, 8, 10), (256, 4, 6), (512, 8, 14), (3, 2, 3)])
def test_subset_loss_matches_reference(E: int, k: int, M: int, renormalize: bool, device: str) -> None:
    gen = torch.Generator().manual_seed(E * 100 + k * 10 + M)
    T = 257
    logits, ids, gram, cross, target_sq, target_w = make_problem(T, E, k, M, True, gen)
    keep = random_candidates(E, M - k, 40, gen)
    group = torch.randint(0, 5, (T,), generator=gen)
    d = lambda t: t.to(device)  # noqa: E731
    for layerwise in (True, False):
        kw = dict(target_weights=target_w) if layerwise else dict(cross=cross, target_sq=target_sq)
        got = ops.subset_loss(
            d(gram), d(ids), d(logits), d(keep), d(group), 5, k, renormalize, **{n: d(v) for n, v in kw.items()}
        )
        want = reference.subset_loss(gram, ids, logits, keep, group, 5, k, renormalize, **kw)
        assert got.dtype == torch.float64 and got.shape == (40, 5)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-9)


def test_subset_loss_empty_and_single(device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    logits, ids, gram, cross, target_sq, target_w = make_problem(1, 8, 2, 4, False, gen)
    keep = torch.ones(3, 8, dtype=torch.bool)
    out = ops.subset_loss(gram, ids, logits, keep, torch.zeros(1, dtype=torch.long), 2, 2, target_weights=target_w)
    # Nothing dropped: zero error, up to the float32 rounding of the target weights.
    torch.testing.assert_close(out, torch.zeros(3, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    e = lambda *s: torch.empty(*s)  # noqa: E731
    out = ops.subset_loss(
        e(0, 10), torch.empty(0, 4, dtype=torch.int32), e(0, 8), keep, torch.empty(0, dtype=torch.long), 2, 2,
        target_weights=e(0, 4),
    )
    assert torch.equal(out, torch.zeros(3, 2, dtype=torch.float64))


def test_subset_loss_same_for_any_thread_count() -> None:
    gen = torch.Generator().manual_seed(2)
    T = 20000
    logits, ids, gram, _, _, target_w = make_problem(T, 8, 2, 6, False, gen)
    keep = random_candidates(8, 4, 9, gen)
    group = torch.randint(0, 3, (T,), generator=gen)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.subset_loss(gram, ids, logits, keep, group, 3, 2, target_weights=target_w)
        torch.set_num_threads(max(2, old))
        many = ops.subset_loss(gram, ids, logits, keep, group, 3, 2, target_weights=target_w)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


# ---- The paper's way: re-run a real MoE block with dropped experts' logits at -inf. --------------


def mixtral_block(E: int, k: int, H: int, seed: int):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=H, intermediate_size=2 * H, num_local_experts=E, num_experts_per_tok=k)
    block = MixtralSparseMoeBlock(cfg).double().eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def block_output_with_dropped(block, x: torch.Tensor, dropped: tuple[int, ...]) -> torch.Tensor:
    """Z^S: the block's own router and experts, with the dropped experts' logits at -inf."""
    logits = torch.nn.functional.linear(x, block.gate.weight)
    logits[:, list(dropped)] = -math.inf
    p = torch.softmax(logits.float(), -1)
    w, idx = torch.topk(p, block.top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return block.experts(x, idx, w.to(x.dtype))


def expert_outputs(block, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[T, M, H]: each token's ranked experts' outputs, computed from the 3-D weights."""
    ex = block.experts
    gate_up = torch.einsum("th,tmih->tmi", x, ex.gate_up_proj[ids.long()])
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.einsum("tmi,tmhi->tmh", ex.act_fn(gate) * up, ex.down_proj[ids.long()])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("keep_r", [6, 4])
@pytest.mark.parametrize("layerwise", [True, False])
def test_subset_loss_equals_rerunning_the_block(seed: int, keep_r: int, layerwise: bool) -> None:
    E, k, H, T, G = 8, 2, 16, 96, 3
    block = mixtral_block(E, k, H, seed)
    x = torch.randn(T, H, dtype=torch.float64)
    group = torch.arange(T) % G
    with torch.no_grad():
        # Layer-wise: the target is the unpruned block on the same input. Progressive: the target
        # is the unpruned block's output on another input (the unpruned model's stream).
        z = block.experts(x, *reversed(block.gate(x)[1:])) if layerwise else block(torch.randn(1, T, H).double())[0]
        logits = torch.nn.functional.linear(x, block.gate.weight).float()
        M = k + E - keep_r
        r = ops.route(logits, M)
        y = expert_outputs(block, x, r.ids).float()
        if layerwise:
            gram, _, _ = ops.expert_gram(y)
            tw = torch.zeros(T, M)
            tw[:, :k] = ops.route(logits, k).weights
            kw = dict(target_weights=tw)
        else:
            gram, cross, target_sq = ops.expert_gram(y, z.float())
            kw = dict(cross=cross, target_sq=target_sq)
        drops = list(itertools.combinations(range(E), E - keep_r))
        keep = torch.ones(len(drops), E, dtype=torch.bool)
        for c, d in enumerate(drops):
            keep[c, list(d)] = False
        got = ops.subset_loss(gram, r.ids, logits, keep, group, G, k, **kw)
        want = torch.stack(
            [
                torch.stack([((z - block_output_with_dropped(block, x, d))[group == g] ** 2).sum() for g in range(G)])
                for d in drops
            ]
        )
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6 * float(want.abs().max()))
    # And so the paper's objective (sum over batches of Frobenius norms) picks the same subset.
    assert int(got.sqrt().sum(1).argmin()) == int(want.sqrt().sum(1).argmin())


def good_args():
    gen = torch.Generator().manual_seed(3)
    logits, ids, gram, cross, target_sq, target_w = make_problem(10, 8, 2, 4, False, gen)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, 3] = False
    return dict(
        gram=gram, ids=ids, logits=logits, keep=keep, group=torch.zeros(10, dtype=torch.long), num_groups=1, k=2,
        renormalize=True, target_weights=target_w, cross=None, target_sq=None,
    ), (cross, target_sq)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(gram=lambda a: a["gram"].double()), "gram must be Float"),
        (dict(ids=lambda a: a["ids"].long()), "ids must be Int"),
        (dict(keep=lambda a: a["keep"].float()), "keep must be Bool"),
        (dict(group=lambda a: a["group"].int()), "group must be Long"),
        (dict(gram=lambda a: a["gram"][:, :5].contiguous()), r"M\(M\+1\)/2"),
        (dict(logits=lambda a: a["logits"][:9]), "share T"),
        (dict(k=lambda a: 5), "k <= M <= E"),
        (dict(k=lambda a: 9), "k must be in 1..8"),
        (dict(keep=lambda a: torch.tensor([[True] + [False] * 7])), "fewer than k"),
        (dict(keep=lambda a: torch.tensor([[True] * 5 + [False] * 3])), "drops 3 experts but ids rank only M = 4"),
        (dict(group=lambda a: torch.full((10,), 1)), r"group ids must lie in \[0, num_groups"),
        (dict(target_weights=lambda a: None), "either target_weights"),
        (dict(target_weights=lambda a: torch.full((10, 4), 0.25)), "at most k = 2 nonzero weights"),
        (dict(ids=lambda a: torch.full((10, 4), 8, dtype=torch.int32)), "ids must lie in"),
        (dict(logits=lambda a: torch.randn(8, 10).t()), "contiguous"),
        (dict(gram=lambda a: a["gram"].unsqueeze(0)), "2 dimensions"),
    ],
)
def test_subset_loss_bad_input(change, match: str) -> None:
    args, _ = good_args()
    for name, fn in change.items():
        args[name] = fn(args)
    with pytest.raises(RuntimeError, match=match):
        ops.subset_loss(**args)


def test_gram_bad_input() -> None:
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.expert_gram(torch.randn(2, 3, 4).double())
    with pytest.raises(RuntimeError, match="3 dimensions"):
        ops.expert_gram(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="target must be Float"):
        ops.expert_gram(torch.randn(2, 3, 4), torch.randn(2, 4).half())
    with pytest.raises(RuntimeError, match=r"target must be \[T, H\]"):
        ops.expert_gram(torch.randn(2, 3, 4), torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.expert_gram(torch.randn(4, 3, 2).transpose(0, 2))


def test_opcheck() -> None:
    args, (cross, target_sq) = good_args()
    torch.library.opcheck(torch.ops.moe_fast.subset_loss.default, tuple(args.values()))
    prog = dict(args, target_weights=None, cross=cross, target_sq=target_sq)
    torch.library.opcheck(torch.ops.moe_fast.subset_loss.default, tuple(prog.values()))
    y = torch.randn(9, 4, 12)
    torch.library.opcheck(torch.ops.moe_fast.expert_gram.default, (y,))
    torch.library.opcheck(torch.ops.moe_fast.expert_gram.default, (y.bfloat16(), torch.randn(9, 12).bfloat16()))


def test_traces_under_torch_compile() -> None:
    args, _ = good_args()

    def losses(y: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, tw: torch.Tensor):
        gram, _, _ = ops.expert_gram(y)
        out = ops.subset_loss(gram, ids, logits, keep, torch.zeros(y.shape[0], dtype=torch.long), 1, 2, target_weights=tw)
        return out.sqrt().sum(1)

    y = torch.randn(10, 4, 6)
    a = (y, args["logits"], args["ids"], args["keep"], args["target_weights"])
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*a), losses(*a))


def test_gram_with_target_and_zero_hidden(device: str) -> None:
    # No data to read: the Gram entries, cross products and ||z||^2 are all zero (they were left
    # uninitialised when the binding passed the empty target's null pointer).
    y, z = torch.randn(3, 2, 0), torch.randn(3, 0)
    for _ in range(3):  # a few calls, so that recycled memory would show up
        junk = torch.full((1 << 16,), 6.2e26)  # noqa: F841  (fills what the allocator may hand back)
        del junk
        got = ops.expert_gram(y.to(device), z.to(device))
        want = reference.expert_gram(y, z)
        for g, w in zip(got, want):
            assert g.shape == w.shape and torch.equal(g.cpu(), torch.zeros_like(w)), (g, w)


def _ids_case(name: str):
    """(logits [2, 3], ids [2, M]) with one bad row: the review's cases and their kin."""
    logits = torch.tensor([[-math.inf, -0.8, 3.0], [0.5, 2.0, -1.0]])
    good = reference.route(logits, 3).ids
    ids = good.clone()
    if name == "unranked":  # the review's: logits [-inf, -0.8, 3], ids [2, 0, 1]
        ids[0] = torch.tensor([2, 0, 1])
    elif name == "repeated":
        ids[1] = torch.tensor([1, 1, 0])
    elif name == "not_top":  # in order, but expert 1 ranks before 0: not the top two
        return logits, torch.tensor([[2, 0], [1, 0]], dtype=torch.int32)
    elif name == "tie_order":  # equal logits: the lower index comes first
        logits = torch.tensor([[1.0, 1.0, 0.0], [0.5, 2.0, -1.0]])
        ids = reference.route(logits, 3).ids.clone()
        ids[0, :2] = torch.tensor([1, 0])
    return logits, ids.to(torch.int32)


@pytest.mark.parametrize("name", ["unranked", "repeated", "not_top", "tie_order"])
def test_subset_loss_rejects_unranked_ids(name: str) -> None:
    logits, ids = _ids_case(name)
    T, M = ids.shape
    gram = torch.ones(T, M * (M + 1) // 2)
    tw = torch.zeros(T, M)
    tw[:, 0] = 1.0
    args = (gram, ids, logits, torch.ones(1, 3, dtype=torch.bool), torch.zeros(T, dtype=torch.long), 1, 1)
    with pytest.raises(RuntimeError, match="not ranked"):
        ops.subset_loss(*args, target_weights=tw)
    with pytest.raises(ValueError, match="not ranked"):
        reference.subset_loss(*args, target_weights=tw)
    # The rows route gives are accepted by both, with the same result.
    good = reference.route(logits, M).ids
    ok = (gram, good, *args[2:])
    torch.testing.assert_close(ops.subset_loss(*ok, target_weights=tw), reference.subset_loss(*ok, target_weights=tw))
