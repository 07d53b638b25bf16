"""The pruning search for routers other than plain softmax without group selection: GLM-4.5's
sigmoid router with a selection bias (n_group = 1) and gpt-oss' biased softmax over the chosen
logits. Exhaustive pruning (layer-wise and progressive) equals a brute force that re-runs the stock transformers
block with the dropped experts masked (stock code, parameters edited: the selection bias or the
router bias at -inf), and the exported checkpoint loads in plain transformers and equals the masked
original. Grouped routers (DeepSeek-V3 with topk_group < n_group): tests/pruning/test_prune_grouped_routers.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_fast
from moe_fast.adapters import get_adapter

from helpers.brute_force import BATCH, check_layer
from helpers.routing_reference import masked_routers
from helpers.stock_brute_force import brute_force as stock_brute_force
from helpers.tiny_models import VOCAB, tiny_model

FAMILIES = ("glm4_moe", "gpt_oss")
KEEP = {"glm4_moe": 6, "gpt_oss": 5}


def _ids(seed: int, n: int = 8, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(200 + seed))


def brute_force(model, family: str, ids: torch.Tensor, keep: int, mode: str = "layerwise") -> dict[int, dict[tuple, float]]:
    """Every dropped set of ``E - keep`` experts, scored by the stock block (helpers.stock_brute_force)."""
    E = get_adapter(model).num_experts
    return stock_brute_force(model, family, ids, lambda: itertools.combinations(range(E), E - keep), mode)


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
