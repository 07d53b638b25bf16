"""How every command reads a checkpoint's dtype and tokenizer (moe_fast.loading), and peak RSS (moe_fast.memory)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moe_fast.loading import checkpoint_dtype, from_pretrained_dtype, load_tokenizer, parse_dtype, resolve_dtype, match_dequantized_experts
from moe_fast.memory import peak_rss_bytes, process_max_rss_bytes


def test_auto_means_the_checkpoints_dtype():
    assert resolve_dtype("auto", SimpleNamespace(dtype=torch.bfloat16)) == torch.bfloat16
    assert resolve_dtype(None, SimpleNamespace(torch_dtype="float16")) == torch.float16
    assert resolve_dtype("auto", SimpleNamespace()) == torch.float32  # none recorded
    assert resolve_dtype("float32", SimpleNamespace(dtype=torch.bfloat16)) == torch.float32
    assert checkpoint_dtype(SimpleNamespace(dtype="int8")) == torch.float32


def test_dtype_names():
    assert parse_dtype(torch.float16, torch.float32) == torch.float16
    with pytest.raises(ValueError, match="dtype must be auto, float32, bfloat16, float16"):
        parse_dtype("float64", torch.float32)
    assert from_pretrained_dtype("auto") == "auto" and from_pretrained_dtype("bfloat16") == torch.bfloat16


def test_a_checkpoint_without_tokenizer_gives_none(tmp_path):
    assert load_tokenizer(tmp_path) is None


def test_peak_rss_is_at_least_what_is_resident_now():
    assert peak_rss_bytes() > 0 and process_max_rss_bytes() > 0


def test_dequantized_experts_take_their_biases_dtype_and_keep_their_values():
    """transformers < 5.24 loads MXFP4 experts in bf16 beside float32 biases: the projections are
    cast to the biases' dtype, exactly, and nothing else changes."""
    from helpers.tiny_models import tiny_model

    model = tiny_model("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    experts.gate_up_proj.data = experts.gate_up_proj.data.to(torch.bfloat16)
    want = experts.gate_up_proj.detach().float().clone()
    before = {n: t.dtype for n, t in model.named_buffers()}
    match_dequantized_experts(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(experts.gate_up_proj, want)
    assert {n: t.dtype for n, t in model.named_buffers()} == before
