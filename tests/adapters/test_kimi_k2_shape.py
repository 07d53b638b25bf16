"""Kimi-K2-shaped routers: DeepSeek-V3's sigmoid router with a selection bias over 384 experts
(no group selection, top-8, routed_scaling_factor 2.827). The kernels take up to 512 experts, so
patching, skipping and export serve these checkpoints; here against stock transformers."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

import moe_fast
from moe_fast.adapters import get_adapter
from moe_fast.pruning.export import prune_loaded_model

from helpers.routing_reference import masked_routers
from helpers.tiny_models import VOCAB, tiny_model

KIMI = dict(n_routed_experts=384, num_experts_per_tok=8, n_group=1, topk_group=1, routed_scaling_factor=2.827,
            num_hidden_layers=2)


def _ids(seed: int, batch: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(300 + seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_384_expert_router_patches_like_stock_transformers():
    model = tiny_model("deepseek_v3", **KIMI)
    adapter = get_adapter(model)
    assert adapter.num_experts == 384 and adapter.routing().grouped is False
    router = adapter.moe_blocks(model)[0].router
    x = torch.randn(64, model.config.hidden_size)
    ids = _ids(0)
    with torch.no_grad():
        stock, stock_route = model(ids).logits, router(x)
        moe_fast.patch(model)
        patched, patched_route = model(ids).logits, router(x)
        moe_fast.unpatch(model)
        after = model(ids).logits
    assert _rel(patched, stock) < 1e-5
    assert torch.equal(after, stock)
    assert torch.equal(patched_route[2].sort(-1).values, stock_route[2].sort(-1).values)
    assert int(patched_route[2].max()) >= 256, "no token reached the experts past 256: the test would not see the limit"


def test_384_expert_checkpoint_pruned_to_half_loads_in_transformers_and_equals_the_masked_original(tmp_path):
    model = tiny_model("deepseek_v3", **KIMI)
    adapter = get_adapter(model)
    keep_list = sorted(torch.randperm(384, generator=torch.Generator().manual_seed(5))[:192].tolist())
    keep = {ref.layer: keep_list for ref in adapter.moe_blocks(model)}
    ids = _ids(1)
    with torch.no_grad(), masked_routers(model, adapter, keep):
        expected = model(ids).logits
    prune_loaded_model(model, adapter, keep, {"kept": {str(k): v for k, v in keep.items()}})
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["n_routed_experts"] == 192
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert _rel(got, expected) < 1e-5
