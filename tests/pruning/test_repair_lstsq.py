"""``prune(..., repair="lstsq")``: the least-squares refit of the kept experts' down projections.

The reference here shares no code with moe_fast.pruning: it captures the stock block's inputs and
outputs with hooks, routes the pruned layer by hand (Mixtral: softmax, top-k over the kept experts,
renormalized), builds the least-squares features w * act(gate) * up per kept expert by hand and
solves with ``torch.linalg.lstsq``.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moe_fast
import moe_fast.pruning.pipeline as pipeline_mod
import moe_fast.pruning.repair as repair_mod
from helpers.brute_force import calibration_ids
from helpers.checkpoints import save_checkpoint
from helpers.reference_blocks import block_io
from helpers.tiny_models import VOCAB, tiny_mixtral, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH = 4


# --- the independent reference --------------------------------------------------------------------------
@torch.no_grad()
def features(block, x: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """F [T, r * I]: per kept expert p, w_tp * silu(gate) * up of token t (0 where t does not route to it)."""
    k = block.gate.top_k
    W = block.gate.weight.double()
    logits = x @ W.T
    dropped = [e for e in range(W.shape[0]) if e not in kept]
    logits[:, dropped] = -math.inf
    top, idx = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    gu = block.experts.gate_up_proj.double()
    inter = gu.shape[1] // 2
    F = torch.zeros(x.shape[0], len(kept) * inter, dtype=torch.float64)
    for p, e in enumerate(kept):
        act = torch.nn.functional.silu(x @ gu[e, :inter].T) * (x @ gu[e, inter:].T)
        w = (top * (idx == e)).sum(-1, keepdim=True)
        F[:, p * inter:(p + 1) * inter] = w * act
    return F


@torch.no_grad()
def stacked_down(downs: list[torch.Tensor]) -> torch.Tensor:
    """[r * I, H]: the down projections [H, I] of the kept experts, stacked for y = F @ it."""
    return torch.cat([d.double().T for d in downs])


def paper(err: torch.Tensor, seq_len: int) -> float:
    """sum over calibration batches of the Frobenius norm of the error [N * L, H] (tokens in sequence order)."""
    per_seq = (err ** 2).sum(-1).view(-1, seq_len).sum(-1)
    return float(sum(per_seq[i:i + BATCH].sum().sqrt() for i in range(0, per_seq.numel(), BATCH)))


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# --- (2) least squares against an independent solution ------------------------------------------------
def _one_layer_case():
    model = tiny_mixtral(7, layers=1, ffn=8)
    ids = calibration_ids(7, n=20, length=32)
    return model, ids


@pytest.mark.parametrize("exact", [True, False])
def test_lstsq_matches_an_independent_solution(tmp_path, monkeypatch, exact: bool) -> None:
    model, ids = _one_layer_case()
    if exact:  # a vanishing ridge: the repaired weights are the plain least-squares solution
        monkeypatch.setattr(repair_mod, "RIDGE_SCALES", (1e-13,))
    out = str(tmp_path / "out")
    _, report = moe_fast.prune(copy.deepcopy(model), ids, 4, out=out, batch_size=BATCH, progress=False, repair="lstsq")
    kept = report.layers[0].kept
    block = model.model.layers[0].mlp
    x, z = block_io(model, ids, 0)
    x, z = x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])
    F = features(block, x, kept)
    D0 = stacked_down([block.experts.down_proj[e] for e in kept])
    e = z - F @ D0
    best = torch.linalg.lstsq(F, e, driver="gelsd").solution  # [r * I, H]: the optimal correction
    sse_before, sse_best = float((e ** 2).sum()), float(((e - F @ best) ** 2).sum())
    stock = AutoModelForCausalLM.from_pretrained(out)
    D1 = stacked_down([stock.model.layers[0].mlp.experts.down_proj[p] for p in range(len(kept))])
    err_after = z - F @ D1
    sse_after = float((err_after ** 2).sum())
    rep = report.layers[0].repair
    assert rep["loss_before"] == pytest.approx(paper(e, ids.shape[1]), rel=1e-6)
    assert rep["loss_before"] == pytest.approx(report.layers[0].loss[",".join(map(str, report.layers[0].dropped))], rel=1e-6)
    assert rep["loss_after"] == pytest.approx(paper(err_after, ids.shape[1]), rel=1e-6)
    assert sse_best <= sse_after * (1 + 1e-9) and sse_after < sse_before
    assert rep["loss_after"] < rep["loss_before"]
    if exact:
        assert sse_after == pytest.approx(sse_best, rel=1e-6)
        torch.testing.assert_close(D1 - D0, best, rtol=1e-4, atol=1e-5)
    else:  # 640 tokens for 32 features: the held-out choice of the ridge stays close to the optimum
        assert rep["ridge"] is not None and sse_after <= 1.05 * sse_best


def test_a_repair_that_does_not_pay_is_not_applied(tmp_path, monkeypatch) -> None:
    """A solve that would raise the held-out error (forced here) leaves the pruned weights unchanged."""
    model, ids = _one_layer_case()
    monkeypatch.setattr(repair_mod, "_solve", lambda gram, cross, ridge: torch.randn_like(cross) * 10.0)
    out = str(tmp_path / "out")
    _, report = moe_fast.prune(copy.deepcopy(model), ids, 4, out=out, batch_size=BATCH, progress=False, repair="lstsq")
    rep = report.layers[0].repair
    assert rep["ridge"] is None and rep["loss_after"] == rep["loss_before"]
    stock = AutoModelForCausalLM.from_pretrained(out)
    for p, e in enumerate(report.layers[0].kept):
        assert torch.equal(stock.model.layers[0].mlp.experts.down_proj[p], model.model.layers[0].mlp.experts.down_proj[e])


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_never_increases_and_progressive_sees_the_repaired_layer(tmp_path, mode: str) -> None:
    model = tiny_mixtral(3, layers=3, ffn=8)
    ids = calibration_ids(3, n=16, length=32)
    src = save_checkpoint(model, tmp_path / "src")  # the export's weights come from the run's record, not the stream's
    out = str(tmp_path / "out")
    _, report = moe_fast.prune(src, ids, 5, out=out, mode=mode, batch_size=BATCH, progress=False, repair="lstsq")
    for r in report.layers.values():
        assert r.repair["loss_after"] <= r.repair["loss_before"]
    assert any(r.repair["loss_after"] < 0.9 * r.repair["loss_before"] for r in report.layers.values())
    # Layer 1's input in the run: the unpruned model's (layer-wise) or the exported, repaired model's.
    stock = AutoModelForCausalLM.from_pretrained(out)
    source = model if mode == "layerwise" else stock
    x, _ = block_io(source, ids, 1)
    _, z = block_io(model, ids, 1)  # target: the unpruned block on the unpruned stream
    x, z = x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])
    kept = report.layers[1].kept
    block = model.model.layers[1].mlp
    F = features(block, x, kept)
    e = z - F @ stacked_down([block.experts.down_proj[i] for i in kept])
    assert report.layers[1].repair["loss_before"] == pytest.approx(paper(e, ids.shape[1]), rel=1e-6)


# --- (1) the export loads in stock transformers and is the in-memory repaired model ------------------------
def test_loaded_model_export_equals_in_memory_model(tmp_path) -> None:
    model = tiny_mixtral(5, layers=2)
    ids = calibration_ids(5, n=12, length=16)
    out, plain = str(tmp_path / "out"), str(tmp_path / "plain")
    repaired, report = moe_fast.prune(copy.deepcopy(model), ids, 4, out=out, batch_size=BATCH, progress=False, repair="lstsq")
    moe_fast.prune(copy.deepcopy(model), ids, 4, out=plain, batch_size=BATCH, progress=False)
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert stock.config.num_local_experts == 4
    torch.testing.assert_close(logits_of(stock, ids), logits_of(repaired, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(logits_of(stock, ids), logits_of(AutoModelForCausalLM.from_pretrained(plain), ids), atol=1e-3)
    with open(os.path.join(out, "moe_fast_report.json")) as f:
        saved = json.load(f)
    assert saved["settings"]["repair"] == "lstsq"
    for i, entry in saved["layers"].items():
        assert set(entry["repair"]) >= {"loss_before", "loss_after", "ridge"}
        assert entry["repair"]["loss_after"] == report.layers[int(i)].repair["loss_after"]
    assert stock.config.moe_fast["pruning"]["repair"] == "lstsq"


@pytest.mark.parametrize("family,keep", [
    ("mixtral", 4), ("qwen3_moe", 6), ("qwen2_moe", 4), ("olmoe", 4), ("deepseek_v3", 8), ("glm4_moe", 4),
])
@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_checkpoint_export_loads_in_stock_transformers(tmp_path, family: str, keep: int, mode: str) -> None:
    """Checkpoint runs (Mixtral's w1/w2/w3 and Qwen's gate/up/down_proj hub keys; Qwen2-MoE's shared
    expert and dense layer; DeepSeek-V3's grouped sigmoid router, kept equal per group, and GLM-4.5's
    scaled one) export what the loaded-model run holds in memory."""
    model = tiny_model(family)
    ids = calibration_ids(1, n=12, length=16, vocab=VOCAB)
    src = save_checkpoint(model, tmp_path / "src")
    out = str(tmp_path / "out")
    kwargs = dict(mode=mode, batch_size=BATCH, progress=False, repair="lstsq")
    _, report = moe_fast.prune(src, ids, keep, out=out, **kwargs)
    in_memory, mem_report = moe_fast.prune(copy.deepcopy(model), ids, keep, **kwargs)
    unwritten, _ = moe_fast.prune(src, ids, keep, **kwargs)  # no out: the source loaded whole and repaired
    assert report.kept == mem_report.kept
    stock = AutoModelForCausalLM.from_pretrained(out)
    expect = logits_of(in_memory, ids)
    torch.testing.assert_close(logits_of(stock, ids), expect, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_of(unwritten, ids), expect, rtol=0, atol=1e-4)
    assert all(r.repair["loss_after"] <= r.repair["loss_before"] for r in report.layers.values())


# --- (3) no repair: the export is the plain pruned checkpoint ------------------------------------------------
def test_no_repair_export_is_the_sliced_source(tmp_path) -> None:
    model = tiny_mixtral(2, layers=2)
    ids = calibration_ids(2)
    src = save_checkpoint(model, tmp_path / "src", shard=None)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _, report = moe_fast.prune(src, ids, 4, out=a, batch_size=BATCH, progress=False)
    moe_fast.prune(src, ids, 4, out=b, batch_size=BATCH, progress=False, repair=None)
    for name in sorted(os.listdir(a)):
        if name.endswith(".safetensors") or name.endswith("index.json") or name == "config.json":
            with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
                assert fa.read() == fb.read(), name
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    exported = {}
    for name in os.listdir(a):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(a, name), "pt") as f:
                exported.update({k: f.get_tensor(k) for k in f.keys()})
    for layer, kept in report.kept.items():
        for new, old in enumerate(kept):
            for w in ("w1", "w2", "w3"):
                key = f"model.layers.{layer}.block_sparse_moe.experts.{{}}.{w}.weight"
                assert torch.equal(exported[key.format(new)], original[key.format(old)])
    with open(os.path.join(a, "moe_fast_report.json")) as f:
        saved = json.load(f)
    assert "repair" not in saved["settings"] and all("repair" not in r for r in saved["layers"].values())
    with open(os.path.join(a, "config.json")) as f:
        assert "repair" not in json.load(f)["moe_fast"]["pruning"]
    assert "repair" not in report.table()


# --- (4) bad input: refused before any work -------------------------------------------------------------------
def _no_forward(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the calibration stream was built: refused too late")

    monkeypatch.setattr(pipeline_mod, "HiddenStates", boom)


def test_unknown_repair_refused_before_work(tmp_path, monkeypatch) -> None:
    _no_forward(monkeypatch)
    model = tiny_mixtral(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="repair must be None or one of lstsq, merge; got 'bogus'"):
        moe_fast.prune(model, calibration_ids(0), 4, out=out, progress=False, repair="bogus")
    assert not os.path.exists(out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_unsupported_family_refused_before_work(tmp_path, monkeypatch) -> None:
    _no_forward(monkeypatch)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="not supported for the gpt_oss family"):
        moe_fast.prune(tiny_model("gpt_oss"), calibration_ids(0, vocab=VOCAB), 4, out=out, progress=False, repair="lstsq")
    assert not os.path.exists(out) and not os.path.exists(out + pipeline_mod.PARTIAL_SUFFIX)


def test_statistics_too_large_for_the_device_refused_before_work(tmp_path, monkeypatch) -> None:
    """Keep 4 of a width-48 Mixtral: n = 192 features, 3 x 192^2 x 4 + 2 x 192 x 32 x 4 bytes in
    float32 (the smaller of the two statistics dtypes)."""
    _no_forward(monkeypatch)
    need = 3 * 192 * 192 * 4 + 2 * 192 * 32 * 4
    monkeypatch.setattr(repair_mod, "free_bytes", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"4 x 48 = 192 features: .* GiB even in float32 \(.* GiB in float64\), more than"):
        moe_fast.prune(tiny_mixtral(0), calibration_ids(0), 4, out=str(tmp_path / "o"), progress=False, repair="lstsq")
    assert not os.path.exists(str(tmp_path / "o"))


def test_float32_statistics_where_float64_does_not_fit(monkeypatch) -> None:
    """Between the two sizes the statistics are float32: the report says so, and the repair lowers
    each layer's loss about as much as the float64 one (same selection, same ridge grid)."""
    ids = calibration_ids(3)
    wide = moe_fast.prune(tiny_mixtral(3), ids, 4, batch_size=BATCH, progress=False, repair="lstsq").report
    float64_bytes = 3 * 192 * 192 * 8 + 2 * 192 * 32 * 8
    monkeypatch.setattr(repair_mod, "free_bytes", lambda device: float64_bytes - 1)
    narrow = moe_fast.prune(tiny_mixtral(3), ids, 4, batch_size=BATCH, progress=False, repair="lstsq").report
    assert narrow.kept == wide.kept
    for i, r in narrow.layers.items():
        assert r.repair["statistics_dtype"] == "float32" and wide.layers[i].repair["statistics_dtype"] == "float64"
        assert r.repair["statistics_bytes"] * 2 == wide.layers[i].repair["statistics_bytes"]
        assert r.repair["loss_after"] < r.repair["loss_before"], i
        gain64 = wide.layers[i].repair["loss_before"] - wide.layers[i].repair["loss_after"]
        gain32 = r.repair["loss_before"] - r.repair["loss_after"]
        assert gain32 == pytest.approx(gain64, rel=0.05), i


