"""Lazy expert outputs: same selections as the rank-bounded search, exact against brute force."""

from __future__ import annotations

import copy

import pytest
import torch

import moe_fast
from moe_fast.pruning.lazy_outputs import kth_kept_depth
from helpers.brute_force import BATCH, brute_force, calibration_ids, check_layer
from helpers.tiny_models import tiny_mixtral

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kth_kept_depth_counts_ranks_up_to_the_jth_kept() -> None:
    g = torch.Generator().manual_seed(0)
    order = torch.stack([torch.randperm(10, generator=g) for _ in range(50)])[:, :7]
    dropped = torch.rand(3, 10, generator=g) < 0.4
    got = kth_kept_depth(order, dropped, 3)
    for c in range(3):
        for t in range(50):
            kept = [i for i, e in enumerate(order[t].tolist()) if not dropped[c, e]]
            want = kept[2] + 1 if len(kept) >= 3 else 8
            assert int(got[c, t]) == want


def _wide(experts: int, top_k: int, seed: int = 5):
    model = tiny_mixtral(seed, experts=experts, top_k=top_k, layers=1, hidden=32, ffn=8)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.normal_(0.0, 0.05)  # flatter routing: every expert used
    return model


@pytest.mark.parametrize(
    "experts,top_k,keep,search,width,mode",
    [
        (64, 2, 48, "greedy", 1, "layerwise"),
        (64, 2, 52, "beam", 3, "progressive"),
        (128, 8, 112, "beam", 2, "layerwise"),
        (128, 8, 116, "greedy", 1, "progressive"),
        (256, 8, 244, "greedy", 1, "layerwise"),
    ],
)
def test_lazy_greedy_and_beam_select_what_the_rank_bounded_search_selects(experts, top_k, keep, search, width, mode) -> None:
    model = _wide(experts, top_k)
    ids = calibration_ids(5, n=16, length=32)
    kw = dict(mode=mode, search=search, beam_width=width, batch_size=BATCH, progress=False)
    _, full = moe_fast.prune(copy.deepcopy(model), ids, keep, lazy=False, **kw)
    _, lazy = moe_fast.prune(copy.deepcopy(model), ids, keep, lazy=True, **kw)
    a, b = full.layers[0], lazy.layers[0]
    assert b.dropped == a.dropped
    assert sorted(b.loss) == sorted(a.loss)  # the same candidates evaluated at every step
    # Progressive scores are w'Gw - 2 w.c + |z|^2 from float32 entries, each of the size of |z|^2: the
    # cancellation leaves noise of about 1e-7 |z|^2 per token (and the square root magnifies it for the
    # near-zero losses), which the expert batches (composed differently by the two searches) move.
    tol, floor = (1e-5, 1e-9) if mode == "layerwise" else (1e-2, 1e-2 * max(a.loss.values()))
    for key, v in a.loss.items():
        assert b.loss[key] == pytest.approx(v, rel=tol, abs=floor)
    # fewer outputs than the rank bound (k + dropped per token), at least the k + 1 first ranks
    assert top_k + 1 <= b.expert_outputs_per_token < top_k + (experts - keep)


def _special_experts(model):
    """Expert 1 a copy of expert 4 (equal logits and outputs: exact ties between candidates) and
    expert 6 dead (zero router row: logit 0, zero output)."""
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.gate.weight[1] = mlp.gate.weight[4]
            mlp.experts.gate_up_proj[1] = mlp.experts.gate_up_proj[4]
            mlp.experts.down_proj[1] = mlp.experts.down_proj[4]
            mlp.gate.weight[6] = 0.0
            mlp.experts.down_proj[6] = 0.0
    return model


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_lazy_exhaustive_with_ties_and_a_dead_expert_matches_brute_force(mode: str) -> None:
    model = _special_experts(tiny_mixtral(7))
    ids = calibration_ids(7)
    for keep in (2, 4, 6):
        _, ref_losses = brute_force(model, ids, keep, BATCH, mode)
        _, report = moe_fast.prune(copy.deepcopy(model), ids, keep, mode=mode, search="exhaustive", batch_size=BATCH,
                                   progress=False, lazy=True)
        for layer in range(model.config.num_hidden_layers):
            r = report.layers[layer]
            check_layer(r.kept, ref_losses[layer], r.loss, 8, complete=False)
            assert r.scored_exactly + r.discarded_by_bound == len(ref_losses[layer])


def test_lazy_exhaustive_exact_tie() -> None:
    """Two experts with identical weights: dropping either costs the same, and the bound must not
    discard the one of the pair that the arithmetic puts a rounding error lower."""
    model = _special_experts(tiny_mixtral(8))
    ids = calibration_ids(8)
    chosen, ref_losses = brute_force(model, ids, 7, BATCH)
    _, report = moe_fast.prune(copy.deepcopy(model), ids, 7, search="exhaustive", batch_size=BATCH, progress=False, lazy=True)
    for layer in range(2):
        # dropping expert 1 or its copy 4 gives the same block output (up to the expert batches)
        assert ref_losses[layer][(1,)] == pytest.approx(ref_losses[layer][(4,)], rel=1e-7)
        check_layer(report.layers[layer].kept, ref_losses[layer], report.layers[layer].loss, 8, complete=False)


@pytest.mark.parametrize("search,width", [("greedy", 1), ("beam", 2)])
def test_lazy_without_renormalized_weights_selects_what_the_rank_bounded_search_selects(search, width) -> None:
    """OLMoE-style softmax over all experts (norm_topk_prob False): dropping any expert changes every
    token's weights, so the lazy search scores every candidate on every token (not the k + 1 rows)."""
    from helpers.tiny_models import VOCAB, tiny_model

    model = tiny_model("olmoe", seed=3, num_experts=48, num_experts_per_tok=4)
    ids = calibration_ids(3, n=16, length=32, vocab=VOCAB)
    kw = dict(search=search, beam_width=width, batch_size=BATCH, progress=False)
    _, full = moe_fast.prune(copy.deepcopy(model), ids, 40, lazy=False, **kw)
    _, lazy = moe_fast.prune(copy.deepcopy(model), ids, 40, lazy=True, **kw)
    for layer, a in full.layers.items():
        b = lazy.layers[layer]
        assert b.dropped == a.dropped
        assert sorted(b.loss) == sorted(a.loss)
        for key, v in a.loss.items():
            assert b.loss[key] == pytest.approx(v, rel=1e-5, abs=1e-9)
