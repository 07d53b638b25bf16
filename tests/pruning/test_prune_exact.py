"""moe_fast.prune selects exactly what the paper's brute-force enumeration selects."""

from __future__ import annotations

import copy

import pytest
import torch

import moe_fast
from helpers.brute_force import (
    BATCH, all_candidate_losses, brute_force, brute_force_beam, calibration_ids, candidate_loss, capture_block_io, check_layer,
)
from helpers.tiny_models import tiny_mixtral

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
@pytest.mark.parametrize("seed,lazy", [(0, True), (1, True), (2, True), (0, False)])
def test_exhaustive_matches_brute_force(seed: int, mode: str, lazy: bool) -> None:
    model = tiny_mixtral(seed)
    ids = calibration_ids(seed)
    E = model.config.num_local_experts
    for keep in range(2, 8):
        ref_chosen, ref_losses = brute_force(model, ids, keep, BATCH, mode)
        work = copy.deepcopy(model)
        _, report = moe_fast.prune(work, ids, keep, mode=mode, search="exhaustive", batch_size=BATCH, progress=False, lazy=lazy)
        for layer in range(model.config.num_hidden_layers):
            r = report.layers[layer]
            check_layer(r.kept, ref_losses[layer], r.loss, E, complete=not lazy)
            if lazy:  # every candidate is either scored exactly or discarded by its bound
                assert r.scored_exactly == len(r.loss) and r.scored_exactly + r.discarded_by_bound == len(ref_losses[layer])
        if mode == "progressive":  # the paths diverge once a choice differs; check they did not
            assert {i: tuple(r.dropped) for i, r in report.layers.items()} == ref_chosen


def test_mse_objective_matches_brute_force() -> None:
    model = tiny_mixtral(3)
    ids = calibration_ids(3)
    ref_chosen, ref_losses = brute_force(model, ids, 5, BATCH, "layerwise", objective="mse")
    _, report = moe_fast.prune(copy.deepcopy(model), ids, 5, objective="mse", batch_size=BATCH, progress=False)
    for layer in range(2):
        check_layer(report.layers[layer].kept, ref_losses[layer], report.layers[layer].loss, 8)


@pytest.mark.parametrize("search,width", [("greedy", 1), ("beam", 3)])
def test_greedy_and_beam_match_brute_force_elimination(search: str, width: int) -> None:
    model = tiny_mixtral(4)
    ids = calibration_ids(4)
    ref = brute_force_beam(model, ids, 4, BATCH, width)
    _, report = moe_fast.prune(copy.deepcopy(model), ids, 4, search=search, beam_width=width, batch_size=BATCH, progress=False)
    assert {i: tuple(r.dropped) for i, r in report.layers.items()} == ref


def test_fast_reference_is_the_paper_rerun() -> None:
    """The sweep's reference scores equal the literal re-run of the block per candidate."""
    model = tiny_mixtral(6)
    batches = capture_block_io(model, calibration_ids(6), BATCH, 1)
    block = model.model.layers[1].mlp
    cands = [(0,), (2, 5), (1, 3, 7), (0, 1, 2, 3, 4, 5)]
    fast = all_candidate_losses(block, batches, cands)
    for d in cands:
        assert fast[d] == pytest.approx(candidate_loss(block, batches, d), rel=1e-5)


@pytest.mark.parametrize("experts,top_k,keep", [(64, 2, 61), (128, 8, 125)])
def test_many_experts_beam(experts: int, top_k: int, keep: int) -> None:
    model = tiny_mixtral(5, experts=experts, top_k=top_k, layers=1, hidden=32, ffn=8)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight.normal_(0.0, 0.05)  # flatter routing: every expert used
    ids = calibration_ids(5, n=32, length=64)
    batches = capture_block_io(model, ids, BATCH, 0)
    used = torch.unique(torch.topk(torch.cat([x for x, _ in batches]) @ model.model.layers[0].mlp.gate.weight.T, top_k).indices)
    assert used.numel() == experts  # no unused expert: no exact ties that float noise could break
    ref = brute_force_beam(model, ids, keep, BATCH, width=2)
    _, report = moe_fast.prune(copy.deepcopy(model), ids, keep, search="auto", beam_width=2, batch_size=BATCH, progress=False)
    assert report.settings["search"] == "beam"  # C(E, R) is far beyond enumeration
    assert tuple(report.layers[0].dropped) == ref[0]
    assert len(report.layers[0].kept) == keep
