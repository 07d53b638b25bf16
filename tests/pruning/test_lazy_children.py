"""lazy_children: every child's per-group error from k + 1 rows per token, against the block output
computed directly (plain float64 PyTorch, every expert run on every token)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moe_fast import ops, reference
from moe_fast.pruning.lazy_children import child_errors, first_kept
from moe_fast.pruning.lazy_outputs import LazyOutputs, kth_kept_depth


class LinearExperts:
    """Adapter stand-in: expert e maps x to x @ W[e] (what LazyOutputs.extend calls)."""

    def __init__(self, weights: torch.Tensor, top_k: int) -> None:
        self.w, self.top_k, self.num_experts, self.renormalize = weights, top_k, weights.shape[0], True

    def expert_forward(self, experts, e: int, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w[e]


def _store(T: int, E: int, k: int, H: int, rank_bound: int, groups: int, progressive: bool, seed: int):
    """A LazyOutputs holding each token's k + 1 first ranks (as LazyRecorder leaves it), and
    everything the reference needs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w = torch.randn(E, H, H, generator=g) / H**0.5
    logits = torch.randn(T, E, generator=g) * 1.5
    logits[0, 3] = logits[0, 5]  # a tie: the lower index ranks first
    adapter = LinearExperts(w, k)
    order = reference.rank_experts(logits)[0][:, :rank_bound].to(torch.int32).contiguous()
    y_all = torch.einsum("th,ehk->tek", x.double(), w.double())  # [T, E, H]
    first = k + 1
    y = torch.stack([y_all[t, order[t, :first].long()] for t in range(T)]).float()
    top = torch.softmax(logits.double().gather(1, order[:, :k].long()), dim=1)
    z_unpruned = (top.unsqueeze(-1) * y_all.gather(1, order[:, :k].long()[..., None].expand(T, k, H))).sum(1)
    group = torch.randint(0, groups, (T,), generator=g)
    store = LazyOutputs(adapter, None, rank_bound)
    if progressive:
        z = torch.randn(T, H, generator=g)
        gram, cross, tsq = ops.expert_gram(y, z)
        store.add_chunk(x, logits, order, group, y, gram, z=z, cross=cross, tsq=tsq)
        target = z.double()
    else:
        store.add_chunk(x, logits, order, group, y, ops.expert_gram(y)[0], tw=top.float())
        target = z_unpruned
    store.num_groups = groups
    store.finish()
    return store, SimpleNamespace(y_all=y_all, logits=logits.double(), target=target, group=group)


def _reference(ref, dropped: set[int], k: int, groups: int) -> torch.Tensor:
    """Per-group squared error of the block keeping all experts but ``dropped``: each token's top k
    kept experts, softmax renormalized over them."""
    T, E = ref.logits.shape
    keep = torch.tensor([e not in dropped for e in range(E)])
    masked = ref.logits.masked_fill(~keep, float("-inf"))
    chosen = reference.rank_experts(masked.float())[0][:, :k].long()
    w = torch.softmax(ref.logits.gather(1, chosen), dim=1)
    out = (w.unsqueeze(-1) * ref.y_all.gather(1, chosen[..., None].expand(-1, -1, ref.y_all.shape[2]))).sum(1)
    err = ((out - ref.target) ** 2).sum(1)
    return torch.zeros(groups, dtype=torch.float64).index_add_(0, ref.group, err)


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("E,k,parent", [(16, 2, ()), (16, 2, (1, 4, 9)), (24, 4, (0, 2, 3, 7, 11, 20))])
def test_child_errors_match_the_block_output_of_every_child(E, k, parent, progressive) -> None:
    T, H, G = 40, 12, 3
    rank_bound = k + len(parent) + 1
    store, ref = _store(T, E, k, H, rank_bound, G, progressive, seed=E + k + len(parent))
    dropped = torch.zeros(E, dtype=torch.bool)
    dropped[list(parent)] = True
    store.extend(kth_kept_depth(store.order, dropped, k + 1))
    got = child_errors(store, parent, G)
    for e in range(E):
        if e in parent:
            continue
        want = _reference(ref, set(parent) | {e}, k, G)
        assert got[e] == pytest.approx(want, rel=1e-4, abs=1e-5), e


def test_child_errors_refuse_tokens_not_extended() -> None:
    store, _ = _store(20, 16, 2, 8, 8, 2, False, seed=1)
    parent = tuple(int(e) for e in store.order[0, :3])  # drops token 0's first three ranks
    with pytest.raises(RuntimeError, match="extend it first"):
        child_errors(store, parent, 2)


def test_first_kept_lists_kept_positions_in_rank_order() -> None:
    g = torch.Generator().manual_seed(3)
    order = torch.stack([torch.randperm(12, generator=g) for _ in range(30)]).to(torch.int32)
    dropped = torch.rand(12, generator=g) < 0.5
    got = first_kept(order, dropped, 3)
    for t in range(30):
        want = [i for i, e in enumerate(order[t].tolist()) if not dropped[e]][:3]
        assert got[t].tolist() == want
    with pytest.raises(ValueError, match="rank bound"):
        first_kept(order[:, :4], torch.ones(12, dtype=torch.bool), 1)


@pytest.mark.parametrize("skip_dead", [False, True])
@pytest.mark.parametrize("progressive", [False, True])
def test_store_stays_exact_over_a_greedy_sequence_of_extensions(progressive, skip_dead) -> None:
    """Tokens move between depth buckets step after step (rows left behind as dead until their part
    is compacted, pieces merged): every child's error and the padded all-token scoring
    (group_errors) still match the block output, and every token lives in exactly one bucket.
    Children scored from the previous parent's rows equal those scored from scratch. With
    ``skip_dead`` the ranks of dropped experts are not computed (as greedy passes them)."""
    E, k, T, G, steps = 24, 2, 60, 3, 12
    store, ref = _store(T, E, k, 10, k + steps + 1, G, progressive, seed=11)
    g = torch.Generator().manual_seed(12)
    parent: tuple[int, ...] = ()
    cache = {}
    expected = {t: set(range(k + 1)) for t in range(T)}  # ranks whose outputs the store holds
    expected_before = {t: set(v) for t, v in expected.items()}
    for _ in range(steps):
        dropped = torch.zeros(E, dtype=torch.bool)
        dropped[list(parent)] = True
        before, old_depth = store.outputs_computed, store.depth.clone()
        new = store.extend(kth_kept_depth(store.order, dropped, k + 1), dropped if skip_dead else None)
        assert store.outputs_computed == before + new
        for t in range(T):  # what should be held: every rank, or (skip_dead) not those dropped when reached
            for r in range(int(old_depth[t]), int(store.depth[t])):
                if not (skip_dead and int(store.order[t, r]) in parent):
                    expected[t].add(r)
        held = {}
        for ps in store.buckets.values():
            for p in ps:
                rows = p.live_rows()
                for t, slots in zip(p.tok[rows].tolist(), p.slots()[rows].tolist()):
                    held[t] = set(slots)
        assert held == expected
        assert new == sum(len(v) for v in expected.values()) - sum(len(v) for v in expected_before.values())
        expected_before = {t: set(v) for t, v in expected.items()}
        owners = torch.zeros(T, dtype=torch.int64)
        for d, parts in store.buckets.items():
            for p in parts:
                rows = p.live_rows()
                owners.index_add_(0, p.tok[rows], torch.ones_like(rows))
                assert bool((store.depth[p.tok[rows]] == d).all())
        assert bool((owners == 1).all())
        got = child_errors(store, parent, G, cache)  # rescores only the tokens whose kept slots changed
        assert torch.equal(got, child_errors(store, parent, G))
        assert parent in cache and len(cache) == len(parent) + 1
        children = [e for e in range(E) if e not in parent]
        for e in children:
            assert got[e] == pytest.approx(_reference(ref, set(parent) | {e}, k, G), rel=1e-4, abs=1e-5), (parent, e)
        keep = torch.ones(2, E, dtype=torch.bool)
        pick = [children[0], children[-1]]
        for row, e in enumerate(pick):
            keep[row, list(parent) + [e]] = False
        padded = store.group_errors(keep, G)
        for row, e in enumerate(pick):
            assert padded[row] == pytest.approx(_reference(ref, set(parent) | {e}, k, G), rel=1e-4, abs=1e-5)
        parent = tuple(sorted(parent + (children[int(torch.randint(len(children), (1,), generator=g))],)))
