"""Lean lazy search (recompute_outputs): Gram entries held, outputs recomputed; same selections."""

from __future__ import annotations

import copy

import pytest
import torch

import moe_fast
from moe_fast.commands.prune import _recompute
from moe_fast.pruning import lazy_outputs
from moe_fast.pruning.settings import resolve_recompute
from helpers.brute_force import BATCH, brute_force, calibration_ids, check_layer
from helpers.tiny_models import tiny_mixtral
from test_prune_lazy import _special_experts, _wide

pytestmark = pytest.mark.usefixtures("one_thread")


def _counting(monkeypatch) -> list[int]:
    """Counts the (token, expert) pairs the lazy store runs (recording and extension; the
    progressive target's own block forward is not the search's)."""
    count = [0]
    original = lazy_outputs.run_pairs

    def counted(adapter, experts, x, rows, ids):
        out = original(adapter, experts, x, rows, ids)
        count[0] += out.shape[0]
        return out

    monkeypatch.setattr(lazy_outputs, "run_pairs", counted)
    return count


@pytest.mark.parametrize(
    "experts,top_k,keep,search,width,mode,recompute",
    [
        (64, 2, 48, "greedy", 1, "layerwise", (3, 0)),
        (64, 2, 52, "beam", 3, "progressive", True),
        (128, 8, 112, "beam", 2, "layerwise", (9, 2)),
        (128, 8, 116, "greedy", 1, "progressive", (12, 3)),
        (128, 8, 116, "greedy", 1, "layerwise", True),
    ],
)
def test_lean_selects_what_the_rank_bounded_and_the_lazy_search_select(
    monkeypatch, experts, top_k, keep, search, width, mode, recompute
) -> None:
    model = _wide(experts, top_k)
    ids = calibration_ids(5, n=16, length=32)
    kw = dict(mode=mode, search=search, beam_width=width, batch_size=BATCH, progress=False)
    _, full = moe_fast.prune(copy.deepcopy(model), ids, keep, lazy=False, **kw)
    _, lazy = moe_fast.prune(copy.deepcopy(model), ids, keep, lazy=True, **kw)
    count = _counting(monkeypatch)
    _, lean = moe_fast.prune(copy.deepcopy(model), ids, keep, recompute_outputs=recompute, **kw)
    a, b, c = full.layers[0], lazy.layers[0], lean.layers[0]
    assert c.dropped == a.dropped == b.dropped
    assert sorted(c.loss) == sorted(b.loss) == sorted(a.loss)
    # Layer-wise: the same Gram entries up to the expert batches' rounding. Progressive scores are
    # w'Gw - 2 w.c + |z|^2 (cancellation: test_prune_lazy), and a recomputed output's entries come
    # from another expert batch than its first ones: the noise tolerance of the rank-bounded check.
    tol, floor = (1e-6, 1e-12) if mode == "layerwise" else (1e-2, 1e-2 * max(a.loss.values()))
    for key, v in b.loss.items():
        assert c.loss[key] == pytest.approx(v, rel=tol, abs=floor)
    tol, floor = (1e-5, 1e-9) if mode == "layerwise" else (1e-2, 1e-2 * max(a.loss.values()))
    for key, v in a.loss.items():
        assert c.loss[key] == pytest.approx(v, rel=tol, abs=floor)
    # honest counts: every expert row run (recording and recomputation) is in outputs_computed
    tokens = ids.numel()
    assert c.expert_outputs_per_token == pytest.approx(count[0] / tokens, abs=1e-4)
    assert c.expert_outputs_per_token > b.expert_outputs_per_token  # recomputation is counted
    assert c.search_state_bytes < b.search_state_bytes
    # outputs = first ranks + new ranks + recomputed ones; the default lazy search recomputes none
    recomputed = c.lazy_detail["recomputed_outputs_per_token"]
    first_ranks = resolve_recompute(recompute, top_k, top_k + experts - keep)[0]
    assert 0 <= recomputed <= c.expert_outputs_per_token - first_ranks
    # an extended token reruns its kept earlier ranks: none recomputed exactly when none was extended
    assert (recomputed == 0) == (c.expert_outputs_per_token == first_ranks)
    assert b.lazy_detail["recomputed_outputs_per_token"] == 0
    first, ahead = resolve_recompute(recompute, top_k, top_k + experts - keep)
    assert lean.settings["recompute_outputs"] == {"first_ranks": first, "lookahead": ahead}
    assert lazy.settings["recompute_outputs"] is None


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_lean_exhaustive_matches_brute_force(mode: str) -> None:
    """Branch and bound extends without dead experts: every earlier rank is recomputed."""
    model = _special_experts(tiny_mixtral(7))
    ids = calibration_ids(7)
    for keep in (2, 5):
        _, ref_losses = brute_force(model, ids, keep, BATCH, mode)
        _, report = moe_fast.prune(copy.deepcopy(model), ids, keep, mode=mode, search="exhaustive", batch_size=BATCH,
                                   progress=False, lazy=True, recompute_outputs=(3, 1))
        for layer in range(model.config.num_hidden_layers):
            r = report.layers[layer]
            check_layer(r.kept, ref_losses[layer], r.loss, 8, complete=False)


def test_lean_settings_are_checked() -> None:
    model = tiny_mixtral(7)
    ids = calibration_ids(7)
    with pytest.raises(ValueError, match="first_ranks >= top-k \\+ 1 = 3"):
        moe_fast.prune(copy.deepcopy(model), ids, 4, search="greedy", progress=False, recompute_outputs=(2, 1))
    with pytest.raises(ValueError, match="lookahead >= 0"):
        moe_fast.prune(copy.deepcopy(model), ids, 4, search="greedy", progress=False, recompute_outputs=(4, -1))
    with pytest.raises(ValueError, match="bool or a pair"):
        moe_fast.prune(copy.deepcopy(model), ids, 4, search="greedy", progress=False, recompute_outputs=(4,))
    with pytest.raises(ValueError, match="lazy search only"):
        moe_fast.prune(copy.deepcopy(model), ids, 4, search="greedy", progress=False, lazy=False, recompute_outputs=True)
    assert resolve_recompute(True, 8, 72) == (18, 6)
    assert resolve_recompute(True, 2, 4) == (4, 2)
    assert resolve_recompute((100, 3), 8, 72) == (72, 3)  # clamped to the rank bound
    assert resolve_recompute(False, 8, 72) is None
    assert (_recompute(None), _recompute("default"), _recompute("12,4")) == (False, True, (12, 4))
    with pytest.raises(ValueError, match="D0,L"):
        _recompute("12")
