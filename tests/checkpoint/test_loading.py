"""How every command reads a checkpoint's dtype and tokenizer (moe_fast.checkpoint.loading), and peak RSS (moe_fast.host.ram)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moe_fast.checkpoint.loading import checkpoint_dtype, from_pretrained_dtype, load_tokenizer, parse_dtype, resolve_dtype, match_dequantized_experts
from moe_fast.host.ram import peak_rss_bytes, process_max_rss_bytes


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


class _Records(__import__("logging").Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record) -> None:
        self.messages.append(str(record.msg))


def _checkpoint_with(tmp_path, edit) -> str:
    import os

    from safetensors.torch import load_file, save_file

    from helpers.tiny_models import tiny_model

    tiny_model("mixtral").save_pretrained(tmp_path)
    (shard,) = [name for name in os.listdir(tmp_path) if name.endswith(".safetensors")]
    state = load_file(tmp_path / shard)
    edit(state)
    save_file(state, tmp_path / shard, metadata={"format": "pt"})
    return str(tmp_path)


@pytest.mark.parametrize("case", ["missing", "unexpected"])
def test_load_report_only_when_the_load_is_not_refused(tmp_path, case):
    """A refused load says one thing (moe_fast's error naming the tensors), not also transformers'
    report of the same keys, whatever the logging setup (CI=true makes transformers propagate it);
    a load that goes through keeps transformers' report (unexpected keys are worth seeing)."""
    import logging

    from moe_fast.checkpoint.loading import load_pretrained

    if case == "missing":
        def drop_down_projections(state: dict) -> None:  # every expert's w2 of layer 1: a whole tensor missing
            for key in [k for k in state if k.startswith("model.layers.1.") and k.endswith(".w2.weight")]:
                del state[key]

        path = _checkpoint_with(tmp_path, drop_down_projections)
    else:
        path = _checkpoint_with(tmp_path, lambda s: s.__setitem__("model.extra_thing", torch.zeros(2)))
    seen = _Records()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(seen)
    try:
        if case == "missing":
            with pytest.raises(ValueError, match="has no weights for model.layers"):
                load_pretrained(path)
        else:
            load_pretrained(path)
    finally:
        logger.removeHandler(seen)
    reports = [m for m in seen.messages if "LOAD REPORT" in m]
    assert len(reports) == (0 if case == "missing" else 1), seen.messages
