"""gpt-oss checkpoints in OpenAI's MXFP4 layout (tests/helpers/mxfp4_checkpoint.py writes a tiny one).

References: transformers' own dequantization (``convert_moe_packed_tensors`` and the model it loads
with ``Mxfp4Config(dequantize=True)``), a decoder of the format written here element by element
in float64, pruning of the dequantized model transformers loads, and that model with the dropped
experts' router bias at -inf (stock code) for the exported checkpoint.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import moe_fast
from moe_fast.checkpoint import mxfp4
from moe_fast.adapters import get_adapter
from moe_fast.serving.patching import current_betas
from moe_fast.pruning.source import CheckpointSource, checkpoint_weight_map

from helpers.mxfp4_checkpoint import (
    FP4_MAGNITUDES, HIDDEN, INTERMEDIATE, OPENAI_QUANTIZATION_CONFIG, load_dequantized, mxfp4_state_dict, tiny_gpt_oss,
    write_mxfp4_checkpoint,
)
from helpers.tiny_models import VOCAB, tiny_tokenizer

KEEP = 5
PROJS = ("gate_up_proj", "down_proj")


def _ids(seed: int, n: int = 8, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(300 + seed))


def _read(path: str, key: str) -> torch.Tensor:
    weight_map = checkpoint_weight_map(path)
    with safe_open(os.path.join(path, weight_map[key]), framework="pt", device="cpu") as f:
        return f.get_tensor(key)


def _decode_float64(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The format decoded one element at a time: column 2b of group g is the low nibble of byte b,
    2b + 1 its high nibble; value = sign * magnitude * 2 ** (scale - 127); then [E, K, rows]."""
    E, rows, G, B = blocks.shape
    out = torch.empty(E, rows, G * 2 * B, dtype=torch.float64)
    for e in range(E):
        for r in range(rows):
            for g in range(G):
                factor = 2.0 ** (int(scales[e, r, g]) - 127)
                for b in range(B):
                    byte = int(blocks[e, r, g, b])
                    for half, code in ((0, byte & 0x0F), (1, byte >> 4)):
                        value = FP4_MAGNITUDES[code & 7] * factor
                        out[e, r, g * 2 * B + 2 * b + half] = -value if code & 8 else value
    return out.transpose(1, 2)


# --- (a) dequantization ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_dequantize_is_transformers_bit_for_bit_on_any_bytes(dtype):
    """Every byte value and every scale (0 and 255 included: 2**-127 and 2**128 = inf, NaN for 0 * inf)."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 256, (3, 40, 2), generator=g, dtype=torch.uint8)
    scales[0, 0] = torch.tensor([0, 255], dtype=torch.uint8)
    ours = mxfp4.dequantize(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.shape == theirs.shape == (3, 64, 40) and ours.dtype == dtype
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(ours.view(bits), theirs.view(bits))


def test_dequantize_equals_the_format_decoded_by_hand():
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 6, 3, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 150, (2, 6, 3), generator=g, dtype=torch.uint8)
    expected = _decode_float64(blocks, scales)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32).double(), expected)
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.bfloat16).double(), expected)  # exact in bf16


def test_checkpoint_source_reads_what_transformers_loads(tmp_path):
    """Each layer of the checkpoint source (the expert weights dequantized on read) equals the model
    transformers loads with Mxfp4Config(dequantize=True), bit for bit, in bf16 and float32."""
    path = write_mxfp4_checkpoint(tmp_path / "src")
    for dtype in (torch.bfloat16, torch.float32):
        model = load_dequantized(path, dtype)
        source = CheckpointSource(path, dtype=dtype)
        assert source.dtype == dtype
        for index in range(source.num_layers):
            with source.layer(index) as layer:
                got = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            want = model.model.layers[index].state_dict()
            assert sorted(got) == sorted(want)
            for key in want:
                # transformers < 5.24 keeps the dequantized experts in bf16 whatever dtype is asked:
                # the source gives the asked dtype, with the same (bf16-exact) values
                assert got[key].dtype == dtype and torch.equal(got[key], want[key].to(dtype)), key
            for proj in PROJS:  # and the library's helper against transformers' on the stored pair
                blocks = _read(path, f"model.layers.{index}.mlp.experts.{proj}_blocks")
                scales = _read(path, f"model.layers.{index}.mlp.experts.{proj}_scales")
                assert torch.equal(mxfp4.dequantize(blocks, scales, dtype), convert_moe_packed_tensors(blocks, scales, dtype=dtype))


# --- (b) pruning from the path --------------------------------------------------------------------

@pytest.mark.parametrize("dtype,mode", [(torch.float32, "layerwise"), (torch.bfloat16, "layerwise"),
                                        (torch.float32, "progressive")])
def test_prune_from_path_equals_prune_of_the_dequantized_model(tmp_path, dtype, mode):
    path = write_mxfp4_checkpoint(tmp_path / "src")
    ids = _ids(1)
    from_path = moe_fast.prune(path, ids, keep=KEEP, search="exhaustive", batch_size=4, dtype=dtype, mode=mode,
                               progress=False, return_model=False)
    loaded = moe_fast.prune(load_dequantized(path, dtype), ids, keep=KEEP, search="exhaustive", batch_size=4,
                            mode=mode, progress=False, return_model=False)
    assert sorted(from_path.report.layers) == sorted(loaded.report.layers) == [0, 1]
    for layer, res in from_path.report.layers.items():
        assert res.kept == loaded.report.layers[layer].kept
        assert res.loss == loaded.report.layers[layer].loss  # the same numbers in, the same search


def test_prune_of_a_model_with_bf16_experts_beside_float32_layers_equals_the_uniform_one(tmp_path):
    """transformers < 5.24 leaves dequantized MXFP4 experts in bf16 in a float32 load: pruning such
    a model casts them once (exact) and selects and scores as the all-float32 model."""
    path = write_mxfp4_checkpoint(tmp_path / "src")
    ids = _ids(3)
    mixed = load_dequantized(path, torch.float32)
    for layer in mixed.model.layers:
        for name in PROJS:
            weight = getattr(layer.mlp.experts, name)
            weight.data = weight.data.to(torch.bfloat16)
    got = moe_fast.prune(mixed, ids, keep=KEEP, search="exhaustive", batch_size=4, progress=False, return_model=False)
    want = moe_fast.prune(load_dequantized(path, torch.float32), ids, keep=KEEP, search="exhaustive", batch_size=4,
                          progress=False, return_model=False)
    for layer, res in want.report.layers.items():
        assert got.report.layers[layer].kept == res.kept and got.report.layers[layer].loss == res.loss


# --- (c) export -----------------------------------------------------------------------------------

def _masked_original_logits(path: str, kept: dict[int, list[int]], probe: torch.Tensor) -> torch.Tensor:
    """The dequantized original with each layer's dropped experts unroutable: the stock router's
    bias at -inf (its softmax runs over the chosen logits, so the kept ones are weighted as pruned)."""
    model = load_dequantized(path, torch.float32)
    with torch.no_grad():
        for layer, experts in kept.items():
            bias = model.model.layers[layer].mlp.router.bias
            dropped = [e for e in range(bias.shape[0]) if e not in experts]
            bias[dropped] = -math.inf
        return model(probe).logits


def test_export_stays_mxfp4_and_equals_the_masked_original(tmp_path):
    src = write_mxfp4_checkpoint(tmp_path / "src")
    out = tmp_path / "pruned"
    result = moe_fast.prune(src, _ids(2), keep=KEEP, search="exhaustive", batch_size=4, out=str(out),
                            progress=False, return_model=True)
    kept = {layer: res.kept for layer, res in result.report.layers.items()}
    assert all(len(k) == KEEP for k in kept.values()) and any(k != list(range(KEEP)) for k in kept.values())

    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == KEEP
    assert config["quantization_config"] == OPENAI_QUANTIZATION_CONFIG
    out_map = checkpoint_weight_map(str(out))
    assert not any(key.endswith(("experts.gate_up_proj", "experts.down_proj")) for key in out_map)
    for layer, experts in kept.items():
        index = torch.tensor(experts)
        for name in [f"{p}{s}" for p in PROJS for s in ("_blocks", "_scales")] + ["gate_up_proj_bias", "down_proj_bias"]:
            key = f"model.layers.{layer}.mlp.experts.{name}"
            original, pruned = _read(src, key), _read(str(out), key)
            assert pruned.dtype == original.dtype
            assert pruned.shape == (KEEP, *original.shape[1:]), key
            assert torch.equal(pruned, original[index]), key
        for name in ("weight", "bias"):
            key = f"model.layers.{layer}.mlp.router.{name}"
            assert torch.equal(_read(str(out), key), _read(src, key)[index])
    assert torch.equal(_read(str(out), "lm_head.weight"), _read(src, "lm_head.weight"))

    probe = _ids(3, n=3)
    expected = _masked_original_logits(src, kept, probe)
    loaded = load_dequantized(out, torch.float32)
    assert get_adapter(loaded).num_experts == KEEP
    with torch.no_grad():
        got = loaded(probe).logits
    # Same weights, same per-expert arithmetic in float32; only the experts' sum may run in another order.
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-6
    # The pruned model the run returns is read back by moe_fast (dequantized, in the run's dtype bf16):
    # transformers' dequantized load of the export.
    assert result.model.dtype == torch.bfloat16
    want = load_dequantized(out, torch.bfloat16).state_dict()
    got_state = result.model.state_dict()
    assert sorted(got_state) == sorted(want) and all(torch.equal(got_state[k], want[k]) for k in want)


# --- (d) corrupt checkpoints ------------------------------------------------------------------------

def _corrupt_checkpoint(tmp_path, edit) -> str:
    state = mxfp4_state_dict(tiny_gpt_oss())
    edit(state)
    return write_mxfp4_checkpoint(tmp_path / "bad", state=state)


def test_scales_not_matching_blocks_is_refused_clearly(tmp_path):
    key = "model.layers.1.mlp.experts.down_proj_scales"
    path = _corrupt_checkpoint(tmp_path, lambda s: s.__setitem__(key, s[key][:, :-1].contiguous()))
    with pytest.raises(ValueError, match=r"mlp\.experts\.down_proj_scales has shape \[8, 63, 1\], expected \[8, 64, 1\]"):
        moe_fast.prune(path, _ids(4, n=4), keep=KEEP, search="exhaustive", batch_size=4, progress=False, return_model=False)
    # The export checks all pairs from the headers before writing anything.
    from moe_fast.pruning.export import export_checkpoint

    source = CheckpointSource(path)
    kept = {0: list(range(KEEP)), 1: list(range(KEEP))}
    with pytest.raises(ValueError, match=r"MXFP4 checkpoint .*down_proj_scales has shape \[8, 63, 1\]"):
        export_checkpoint(path, str(tmp_path / "never"), source.adapter, kept, {})
    assert not (tmp_path / "never").exists()


def test_missing_scales_and_wrong_dtype_are_refused_clearly(tmp_path):
    key = "model.layers.0.mlp.experts.gate_up_proj_scales"
    path = _corrupt_checkpoint(tmp_path, lambda s: s.pop(key))
    with pytest.raises(ValueError, match=r"gate_up_proj_scales is missing"):
        moe_fast.prune(path, _ids(4, n=4), keep=KEEP, search="exhaustive", batch_size=4, progress=False, return_model=False)
    blocks = torch.zeros(2, 4, 1, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="down_proj_scales is torch.int8, expected uint8"):
        mxfp4.dequantize(blocks, torch.zeros(2, 4, 1, dtype=torch.int8), name="down_proj")
    with pytest.raises(ValueError, match=r"gate_up_proj_blocks has shape \[2, 4, 1, 8\], expected \[experts, rows, groups, 16\]"):
        mxfp4.dequantize(torch.zeros(2, 4, 1, 8, dtype=torch.uint8), torch.zeros(2, 4, 1, dtype=torch.uint8), name="gate_up_proj")


# --- full-model loads (moe_fast.from_pretrained, skipping, evaluation) --------------------------------

def test_full_model_loads_dequantize_an_mxfp4_checkpoint(tmp_path):
    """Plain ``from_pretrained`` of an MXFP4 checkpoint needs accelerate/kernels or dequantize=True;
    moe_fast's loads pass ``Mxfp4Config(dequantize=True)`` and get transformers' dequantized model."""
    from moe_fast.evaluation.measures import load_model
    from moe_fast.serving.skip_export import skip_checkpoint

    src = write_mxfp4_checkpoint(tmp_path / "src")
    tiny_tokenizer(VOCAB).save_pretrained(src)  # evaluation loads one
    reference = load_dequantized(src, torch.float32)
    probe = _ids(5, n=2)
    with torch.no_grad():
        expected = reference(probe).logits
    model = moe_fast.from_pretrained(src, dtype=torch.float32)
    evaluated, _, _ = load_model(src, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(probe).logits, expected)
        assert torch.equal(evaluated(probe).logits, expected)

    out = tmp_path / "skip"
    skip_checkpoint(src, _ids(6, n=4), out, quantile=0.5, dtype="float32", progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == OPENAI_QUANTIZATION_CONFIG
    assert torch.equal(_read(str(out), "model.layers.0.mlp.experts.gate_up_proj_blocks"),
                       _read(src, "model.layers.0.mlp.experts.gate_up_proj_blocks"))  # weights copied, still MXFP4
    patched = moe_fast.from_pretrained(out, dtype=torch.float32)  # MXFP4 and a skipping record
    betas = current_betas(patched)
    assert sorted(betas) == [0, 1] and all(b is not None for b in betas.values())
    same = moe_fast.patch(load_dequantized(src, torch.float32), betas=betas).model
    with torch.no_grad():
        assert torch.equal(patched(probe).logits, same(probe).logits)


def test_quantized_experts_module_is_refused_with_advice():
    """transformers' MXFP4 experts keep packed uint8 weights (run by Triton kernels): patching
    says what to do instead of failing inside the experts' arithmetic."""
    model = tiny_gpt_oss().float()
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(torch.zeros(8, 64, 32, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match=r"layer 1 .*MXFP4-quantized experts .*Mxfp4Config\(dequantize=True\)"):
        moe_fast.patch(model, betas=0.5)


def test_cli_prune_skip_baseline_and_eval_on_an_mxfp4_checkpoint(tmp_path):
    """The commands that load a whole model (``prune --skip``, a baseline criterion, ``eval``) run
    on an MXFP4 checkpoint on CPU, and what ``prune`` writes stays MXFP4."""
    from moe_fast.cli import main

    src = write_mxfp4_checkpoint(tmp_path / "src")
    tiny_tokenizer(VOCAB).save_pretrained(src)
    calib = str(tmp_path / "ids.pt")
    torch.save(_ids(7), calib)
    runs = {
        "skip": ["--batch-size", "4", "--skip"],
        "reap": ["--criterion", "reap"],  # routing statistics of the whole model, then the export
    }
    for name, extra in runs.items():
        out = tmp_path / name
        assert main(["prune", src, "--keep", str(KEEP), "--calib", calib, "--out", str(out), "--no-progress", *extra]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["num_local_experts"] == KEEP and config["quantization_config"] == OPENAI_QUANTIZATION_CONFIG
        assert _read(str(out), "model.layers.1.mlp.experts.down_proj_blocks").shape == (KEEP, HIDDEN, INTERMEDIATE // 32, 16)
        model = moe_fast.from_pretrained(out, dtype=torch.float32)
        assert model.config.num_local_experts == KEEP
        assert ("skipping" in config.get("moe_fast", {})) == (name == "skip")
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(f"w{i % 90 + 3}" for i in range(400)))
    out_json = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "skip"), "--data", str(text), "--skip", "--seq-len", "32", "--max-tokens", "256",
                 "--prompts", "0", "--json", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["num_experts"] == KEEP and result["skip_rate"] is not None
