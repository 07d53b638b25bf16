"""Exported checkpoints load in plain transformers and equal the unpruned model with experts masked."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moe_fast
from helpers.brute_force import masked_routers
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _all_tensors(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _check_export(out: str, model, ids, report, keep: int) -> None:
    dropped = {i: tuple(r.dropped) for i, r in report.layers.items()}
    with torch.no_grad(), masked_routers(model, dropped):
        want = model(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_local_experts == keep
    with torch.no_grad():
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_local_experts"] == keep
    rec = cfg["moe_fast"]["pruning"]
    assert rec["kept_experts"] == {str(i): r.kept for i, r in report.layers.items()}
    assert rec["objective"] == "paper" and rec["calibration"]["n_samples"] == ids.shape[0]
    # Hub layout: renumbered per-expert projections, router rows of the kept experts in order.
    tensors = _all_tensors(out)
    for i, r in report.layers.items():
        assert f"model.layers.{i}.block_sparse_moe.experts.{keep - 1}.w1.weight" in tensors
        assert f"model.layers.{i}.block_sparse_moe.experts.{keep}.w1.weight" not in tensors
        block = model.model.layers[i].mlp
        torch.testing.assert_close(tensors[f"model.layers.{i}.block_sparse_moe.gate.weight"], block.gate.weight[r.kept])
        inter = block.experts.down_proj.shape[-1]
        for new, old in enumerate(r.kept):
            torch.testing.assert_close(tensors[f"model.layers.{i}.block_sparse_moe.experts.{new}.w1.weight"], block.experts.gate_up_proj[old, :inter])
            torch.testing.assert_close(tensors[f"model.layers.{i}.block_sparse_moe.experts.{new}.w3.weight"], block.experts.gate_up_proj[old, inter:])
            torch.testing.assert_close(tensors[f"model.layers.{i}.block_sparse_moe.experts.{new}.w2.weight"], block.experts.down_proj[old])
    rep = json.load(open(os.path.join(out, "moe_fast_report.json")))
    assert set(rep) >= {"layers", "timings", "peak_memory_bytes"}
    for i, r in report.layers.items():
        entry = rep["layers"][str(i)]
        assert entry["kept"] == r.kept and entry["dropped"] == r.dropped
        assert ",".join(map(str, r.dropped)) in entry["loss"]
    assert rep["peak_memory_bytes"] > 0


def test_export_from_checkpoint_path(tmp_path) -> None:
    model = tiny_mixtral(7, layers=3)
    src = save_checkpoint(model, tmp_path / "src", tokenizer=tiny_tokenizer())
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 1  # sharded
    ids = torch.randint(0, 128, (8, 16))
    out = str(tmp_path / "out")
    pruned, report = moe_fast.prune(src, ids, 5, out=out, batch_size=4, progress=False)
    _check_export(out, model, ids, report, 5)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    assert not os.path.exists(out + ".moe_fast_partial")
    with torch.no_grad(), masked_routers(model, {i: tuple(r.dropped) for i, r in report.layers.items()}):
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-4)


def test_export_from_loaded_model(tmp_path) -> None:
    model = tiny_mixtral(8, layers=2)
    ids = torch.randint(0, 128, (8, 16))
    out = str(tmp_path / "out")
    pruned, report = moe_fast.prune(copy.deepcopy(model), ids, 6, out=out, batch_size=4, tokenizer=tiny_tokenizer(), progress=False)
    _check_export(out, model, ids, report, 6)
    assert pruned.config.num_local_experts == 6
    with torch.no_grad(), masked_routers(model, {i: tuple(r.dropped) for i, r in report.layers.items()}):
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-4)


def test_path_and_loaded_model_agree(tmp_path) -> None:
    model = tiny_mixtral(9, layers=2)
    src = save_checkpoint(model, tmp_path / "src", shard=None)  # a single model.safetensors
    ids = torch.randint(0, 128, (8, 16))
    for mode in ("layerwise", "progressive"):
        _, a = moe_fast.prune(src, ids, 4, mode=mode, batch_size=4, return_model=False, progress=False, out=str(tmp_path / f"a_{mode}"))
        _, b = moe_fast.prune(copy.deepcopy(model), ids, 4, mode=mode, batch_size=4, progress=False)
        assert a.kept == b.kept
        for i in a.layers:
            for key, v in a.layers[i].loss.items():
                assert b.layers[i].loss[key] == pytest.approx(v, rel=1e-5, abs=1e-9)


def test_export_copies_generation_config_with_a_tokenizer(tmp_path) -> None:
    """Text calibration loads the tokenizer, which the export saves; generation_config.json must still come along."""
    from moe_fast.adapters import get_adapter
    from moe_fast.pruning.export import export_checkpoint

    model = tiny_mixtral(5, layers=2)
    src = save_checkpoint(model, tmp_path / "src", tokenizer=tiny_tokenizer())
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 17}, f)
    out = str(tmp_path / "out")
    kept = {0: [0, 1, 2, 3, 4, 5], 1: [1, 2, 3, 4, 5, 6]}
    export_checkpoint(src, out, get_adapter(model.config), kept, {"kept_experts": kept}, tokenizer=tiny_tokenizer())
    assert json.load(open(os.path.join(out, "generation_config.json"))) == json.load(
        open(os.path.join(src, "generation_config.json"))
    )
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.generation_config.max_new_tokens == 17 and loaded.config.num_local_experts == 6
