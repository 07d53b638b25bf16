"""The per-layer phases of pruning (collect -> score -> choose -> apply), one at a time, on one
layer of a tiny Mixtral, against the paper's brute force (re-running the block per candidate)."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_fast.pruning.calibration_batches import CalibrationBatches
from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.hidden_states import HiddenStates, _forward_layer, patched_forward
from moe_fast.pruning.layer_phases import LayerPruner, open_layer
from moe_fast.pruning.strategies.reconstruction import BoundedScores, LazyScores
from moe_fast.pruning.lazy_outputs import LazyOutputs
from moe_fast.pruning.settings import SearchSpec
from moe_fast.pruning.source import LoadedSource
from helpers.brute_force import all_candidate_losses, capture_block_io, masked_routers
from helpers.tiny_models import tiny_mixtral

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 4


def _setup(mode: str = "layerwise", num_keep: int = 5, method: str = "exhaustive", lazy: bool = False, seed: int = 3):
    model = tiny_mixtral(seed)
    ids = torch.randint(0, 128, (10, 12), generator=torch.Generator().manual_seed(seed))
    source = LoadedSource(model)
    calib = CalibrationBatches(ids, BATCH, {})
    spec = SearchSpec(num_experts=8, top_k=2, num_keep=num_keep, method=method, beam_width=2, objective="paper", lazy=lazy)
    pruner = LayerPruner(source.adapter, spec, Dist(), calib.num_batches, calib.num_tokens, chunk_tokens=16)
    stream = HiddenStates(source, calib, list(range(calib.num_batches)), progressive=mode == "progressive")
    return model, ids, source, pruner, stream


def _select(pruner: LayerPruner, stream: HiddenStates, layer, block):
    return pruner.choose(pruner.score(pruner.collect(stream, layer, block)))


def test_hidden_states_keep_the_batches_of_this_rank() -> None:
    model = tiny_mixtral(0)
    ids = torch.arange(10 * 6).reshape(10, 6) % 128
    calib = CalibrationBatches(ids, BATCH, {})
    assert calib.num_batches == 3 and calib.batch(2).shape[0] == 2  # the last batch is short
    stream = HiddenStates(LoadedSource(model), calib, [1, 2], progressive=False)
    assert stream.batches == [(1, slice(0, 4)), (2, slice(4, 6))]
    assert stream.unpruned.shape == (6, 6, 32) and stream.pruned is None
    with torch.no_grad():
        assert torch.equal(stream.unpruned[:4], model.model.embed_tokens(ids[4:8]))


@torch.inference_mode()
def test_collect_moves_the_unpruned_stream_on_like_the_plain_layer() -> None:
    _, _, source, pruner, stream = _setup()
    plain = stream.unpruned.clone()
    with open_layer(source, 0, Dist()) as (layer, block):
        _forward_layer(layer, plain, stream.kwargs, BATCH)
        collected = pruner.collect(stream, layer, block)
    torch.testing.assert_close(stream.unpruned, plain, rtol=1e-5, atol=1e-5)
    tokens = 10 * 12
    assert collected["gram"].shape == (tokens, 5 * 6 // 2)  # M = k + E - R = 5 ranked experts per token
    assert collected["ids"].shape == (tokens, 5) and collected["group"].unique().tolist() == [0, 1, 2]


@torch.inference_mode()
def test_collect_leaves_the_pruned_stream_alone() -> None:
    _, _, source, pruner, stream = _setup("progressive")
    before = stream.pruned.clone()
    with open_layer(source, 0, Dist()) as (layer, block):
        collected = pruner.collect(stream, layer, block)
    assert torch.equal(stream.pruned, before)  # the layer ran to its end on it; the output is not kept
    assert collected["cross"] is not None and collected["target_weights"] is None


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_score_and_choose_agree_with_the_brute_force(mode) -> None:
    model, ids, source, pruner, stream = _setup(mode)
    batches = capture_block_io(model, ids, BATCH, 0)  # layer 0: both streams still equal
    with torch.inference_mode(), open_layer(source, 0, Dist()) as (layer, block):
        collected = pruner.collect(stream, layer, block)
        scores = pruner.score(collected)
        assert isinstance(scores, BoundedScores)
        result = pruner.choose(scores)
    ref = all_candidate_losses(model.model.layers[0].mlp, batches, list(itertools.combinations(range(8), 3)))
    best = min(ref, key=lambda d: (ref[d], d))
    assert result.dropped == list(best) and result.kept == [e for e in range(8) if e not in best]
    assert len(result.loss) == len(ref) == 56
    for d, v in ref.items():
        assert result.loss[",".join(map(str, d))] == pytest.approx(v, rel=2e-5)
    assert result.search == "exhaustive" and result.search_state_bytes > 0 and result.expert_outputs_per_token is None


@pytest.mark.parametrize("method", ["greedy", "beam", "exhaustive"])
def test_lazy_scores_choose_what_the_rank_bounded_ones_choose(method) -> None:
    chosen = {}
    for lazy in (False, True):
        _, _, source, pruner, stream = _setup(num_keep=4, method=method, lazy=lazy)
        with torch.inference_mode(), open_layer(source, 0, Dist()) as (layer, block):
            collected = pruner.collect(stream, layer, block)
            assert isinstance(collected, LazyOutputs) == lazy
            scores = pruner.score(collected)
            assert isinstance(scores, LazyScores if lazy else BoundedScores)
            chosen[lazy] = pruner.choose(scores)
    assert chosen[True].dropped == chosen[False].dropped
    assert chosen[True].expert_outputs_per_token is not None and chosen[True].lazy_detail is not None
    assert (chosen[True].discarded_by_bound is None) == (method != "exhaustive")


@torch.inference_mode()
def test_apply_routes_the_pruned_stream_through_the_kept_experts_only() -> None:
    model, _, source, pruner, stream = _setup("progressive")
    expected = stream.pruned.clone()
    with open_layer(source, 0, Dist()) as (layer, block):
        result = _select(pruner, stream, layer, block)
        with masked_routers(model, {0: tuple(result.dropped)}):
            _forward_layer(layer, expected, stream.kwargs, BATCH)
        pruner.apply(stream, layer, block, result.kept)
    torch.testing.assert_close(stream.pruned, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(stream.pruned, stream.unpruned)


@torch.inference_mode()
def test_apply_does_nothing_layerwise() -> None:
    _, _, source, pruner, stream = _setup("layerwise")
    with open_layer(source, 0, Dist()) as (layer, block):
        result = _select(pruner, stream, layer, block)
        after_collect = stream.unpruned.clone()
        pruner.apply(stream, layer, block, result.kept)
    assert torch.equal(stream.unpruned, after_collect)


@torch.inference_mode()
def test_replay_of_a_resumed_layer_moves_both_streams_on() -> None:
    _, _, source, pruner, stream = _setup("progressive")
    with open_layer(source, 0, Dist()) as (layer, block):
        result = _select(pruner, stream, layer, block)
        pruner.apply(stream, layer, block, result.kept)
    searched = (stream.unpruned.clone(), stream.pruned.clone())
    _, _, source, pruner, stream = _setup("progressive")
    with open_layer(source, 0, Dist()) as (layer, block):
        pruner.replay(stream, layer, block, result)
    torch.testing.assert_close(stream.unpruned, searched[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stream.pruned, searched[1], rtol=1e-5, atol=1e-5)


def test_patched_forward_restores_what_was_there_even_on_error() -> None:
    module = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError):
        with patched_forward(module, lambda x: x):
            assert module(torch.ones(2)).tolist() == [1.0, 1.0]
            raise RuntimeError
    assert "forward" not in module.__dict__

    def own(x):
        return x * 2

    module.forward = own
    with patched_forward(module, lambda x: x):
        pass
    assert module.forward is own


def test_open_layer_gives_the_block_or_none() -> None:
    source = LoadedSource(tiny_mixtral(0))
    with open_layer(source, 1, Dist()) as (layer, block):
        assert layer is source.model.model.layers[1] and block is layer.mlp
