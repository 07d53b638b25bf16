"""Patching each supported family: equal to stock without skipping, to the paper's reference with it."""

from __future__ import annotations

import pytest
import torch

import moe_fast
from helpers.reference_blocks import reference_forward, rel_err
from helpers.tiny_models import FAMILIES, VOCAB, moe_blocks, tiny_model


def _betas(model, ids):
    return moe_fast.calibrate_skipping(model, ids, quantile=0.5, progress=False)


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_patched_equals_stock_float32(family, impl):
    model = tiny_model(family, experts_implementation=impl)
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        stock = model(ids).logits
        moe_fast.patch(model)
        assert model.config._experts_implementation == "moe_fast"
        patched = model(ids).logits
        moe_fast.unpatch(model)
        assert model.config._experts_implementation == impl
        again = model(ids).logits
    assert rel_err(patched, stock) < 1e-5
    assert torch.equal(again, stock)


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_with_betas_equals_reference(family):
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (3, 16))
    cal = _betas(model, ids)
    k = model.config.num_experts_per_tok
    assert cal.layers == [layer for layer, _ in moe_blocks(model)]
    assert all(len(b) == k - 1 for b in cal.betas)
    with torch.no_grad():
        with reference_forward(model, dict(zip(cal.layers, cal.betas))):
            ref = model(ids).logits
        stock = model(ids).logits
        moe_fast.patch(model, betas=cal)
        seen = []
        hooks = [b.gate.register_forward_hook(lambda m, a, out: seen.append(out[2])) for _, b in moe_blocks(model)]
        patched = model(ids).logits
        for h in hooks:
            h.remove()
    # Every layer skips some slots and keeps others (the comparison means something).
    E = model.config.num_experts if family != "mixtral" else model.config.num_local_experts
    for idx in seen:
        skipped = (idx[:, 1:] == E).float().mean()
        assert 0.05 < skipped < 0.95
    assert rel_err(ref, stock) > 1e-3
    assert rel_err(patched, ref) < 1e-5


def test_unsupported_family_names_the_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="llama.*mixtral.*olmoe.*qwen2_moe.*qwen3_moe"):
        moe_fast.patch(model)
