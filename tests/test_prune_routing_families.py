"""The pruning search for routers other than plain softmax without group selection: GLM-4.5's
sigmoid router with a selection bias (n_group = 1) and gpt-oss' biased softmax over the chosen
logits. Exhaustive pruning (layer-wise and progressive) equals a brute force that re-runs the stock transformers
block with the dropped experts masked (stock code, parameters edited: the selection bias or the
router bias at -inf), and the exported checkpoint loads in plain transformers and equals the masked
original. Grouped routers (DeepSeek-V3 with topk_group < n_group) stay refused."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_fast
from moe_fast.adapters import get_adapter

from helpers.brute_force import BATCH, check_layer
from helpers.routing_reference import masked_routers
from helpers.tiny_models import VOCAB, tiny_model

FAMILIES = ("glm4_moe", "gpt_oss")
KEEP = {"glm4_moe": 6, "gpt_oss": 5}


def _ids(seed: int, n: int = 8, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(200 + seed))


@contextlib.contextmanager
def dropped_in_stock_router(router, family: str, dropped):
    """The stock router with the dropped experts unroutable: GLM's selection bias (choice only; the
    weights stay the unbiased scores of the chosen) or gpt-oss' router bias (its logits) at -inf."""
    name = "e_score_correction_bias" if family == "glm4_moe" else "bias"
    tensor = getattr(router, name)
    saved = tensor.detach().clone()
    with torch.no_grad():
        tensor[list(dropped)] = -math.inf
    try:
        yield
    finally:
        with torch.no_grad():
            tensor.copy_(saved)


def _block_output(block, x: torch.Tensor) -> torch.Tensor:
    out = block(x.unsqueeze(0))
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, x.shape[-1])


def _capture(model, adapter, ids: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """Per MoE layer, the block input [T, H] of every calibration batch (unpruned model)."""
    store: dict[int, list[torch.Tensor]] = {}
    handles = []
    for ref in adapter.moe_blocks(model):
        def hook(module, args, _layer=ref.layer):
            store.setdefault(_layer, []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
        handles.append(ref.block.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for lo in range(0, ids.shape[0], BATCH):
                model(ids[lo : lo + BATCH])
    finally:
        for h in handles:
            h.remove()
    return store


def brute_force(model, family: str, ids: torch.Tensor, keep: int, mode: str = "layerwise") -> dict[int, dict[tuple, float]]:
    """Per MoE layer, the paper's loss of every dropped set: the stock block re-run with the dropped
    experts masked, sum over batches of the Frobenius norm (float64) against the unpruned block's
    output on the unpruned model's input. Progressive: the block runs on the input of the model
    pruned so far (earlier layers masked to their best sets)."""
    adapter = get_adapter(model)
    unpruned = _capture(model, adapter, ids)
    E = adapter.num_experts
    kept = {ref.layer: list(range(E)) for ref in adapter.moe_blocks(model)}
    losses: dict[int, dict[tuple, float]] = {}
    with torch.no_grad():
        for ref in adapter.moe_blocks(model):
            inputs = unpruned
            if mode == "progressive":
                with masked_routers(model, adapter, kept):
                    inputs = _capture(model, adapter, ids)
            batches = [(x, _block_output(ref.block, u)) for x, u in zip(inputs[ref.layer], unpruned[ref.layer])]
            vals = {}
            for dropped in itertools.combinations(range(E), E - keep):
                with dropped_in_stock_router(ref.router, family, dropped):
                    vals[dropped] = sum(float(torch.linalg.norm(z.double() - _block_output(ref.block, x).double()))
                                        for x, z in batches)
            losses[ref.layer] = vals
            best = min(vals, key=lambda d: (vals[d], d))
            kept[ref.layer] = [e for e in range(E) if e not in best]
    return losses


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exhaustive_search_equals_stock_brute_force(family, mode):
    model = tiny_model(family)
    assert get_adapter(model).routing().grouped is False
    ids = _ids(1)
    keep = KEEP[family]
    ref_losses = brute_force(model, family, ids, keep, mode)
    E = get_adapter(model).num_experts  # before the prune slices the model in place
    result = moe_fast.prune(model, ids, keep=keep, search="exhaustive", batch_size=BATCH, mode=mode,
                            progress=False, return_model=False)
    assert result.report.settings["lazy"] is False  # the lazy search serves softmax routers only
    assert sorted(result.report.layers) == sorted(ref_losses)
    for layer, res in result.report.layers.items():
        check_layer(res.kept, ref_losses[layer], res.loss, E)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_search_runs_rank_bounded(family):
    """lazy None takes the rank-bounded search for these routers; lazy=True is refused."""
    model = tiny_model(family)
    ids = _ids(2, n=4)
    result = moe_fast.prune(model, ids, keep=KEEP[family], search="greedy", batch_size=BATCH, progress=False,
                            return_model=False)
    assert result.report.settings["lazy"] is False
    assert all(len(res.kept) == KEEP[family] for res in result.report.layers.values())
    with pytest.raises(ValueError, match=f"lazy search for {family} .* is not implemented"):
        moe_fast.prune(model, ids, keep=KEEP[family], search="greedy", lazy=True, progress=False, return_model=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_loads_in_transformers_and_equals_the_masked_original(family, tmp_path):
    model = tiny_model(family)
    ids = _ids(3)
    out = tmp_path / "pruned"
    result = moe_fast.prune(model, ids, keep=KEEP[family], search="exhaustive", batch_size=BATCH, out=str(out),
                            progress=False, return_model=False)
    kept = {layer: res.kept for layer, res in result.report.layers.items()}
    original = tiny_model(family)  # the same seed: ``model`` itself was pruned in place
    probe = _ids(4, n=3)
    with torch.no_grad(), masked_routers(original, get_adapter(original), kept):
        expected = original(probe).logits
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert get_adapter(loaded).num_experts == KEEP[family]
    with torch.no_grad():
        got = loaded(probe).logits
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5


def test_grouped_router_search_is_still_refused():
    model = tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match="pruning search for deepseek_v3 needs subset_loss support for sigmoid/groups: not implemented yet"):
        moe_fast.prune(model, _ids(5, n=2, length=8), keep=8, progress=False)
