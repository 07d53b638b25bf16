"""``prune(..., repair="merge")``: dropped experts folded into the kept experts they resemble.

The reference here shares no code with moe_fast.pruning: it captures the stock block's inputs and
outputs with hooks, routes Mixtral by hand (softmax, top-k, renormalized; the pruned layer with the
dropped experts' logits at -inf), computes every expert's output by hand, and builds the routing
masses, the output cosines, the assignment and the mass-weighted merged weights from
docs/REPAIR.md's formula itself.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_fast
import moe_fast.pruning.pipeline as pipeline_mod
import moe_fast.pruning.repair as repair_mod
import moe_fast.pruning.repair_merge as merge_mod
from moe_fast.adapters import get_adapter
from helpers.brute_force import calibration_ids
from helpers.checkpoints import save_checkpoint
from helpers.reference_blocks import block_io
from helpers.tiny_models import VOCAB, tiny_mixtral, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BATCH = 4


# --- the independent reference --------------------------------------------------------------------------
def expert_out(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """down (silu(gate x) * up x) for one expert's weights gate_up [2I, H], down [H, I]."""
    gate_up, down = gate_up.double(), down.double()
    inter = gate_up.shape[0] // 2
    return (torch.nn.functional.silu(x @ gate_up[:inter].T) * (x @ gate_up[inter:].T)) @ down.T


def route(W: torch.Tensor, x: torch.Tensor, k: int, kept: list[int] | None = None) -> torch.Tensor:
    """[T, E] routing weights (0 off the top-k): softmax over the (kept) experts, top-k, renormalized."""
    logits = x @ W.double().T
    if kept is not None:
        logits[:, [e for e in range(W.shape[0]) if e not in kept]] = -math.inf
    top, idx = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    weights = torch.zeros_like(logits)
    return weights.scatter(1, idx, top / top.sum(-1, keepdim=True))


def paper(err: torch.Tensor, seq_len: int) -> float:
    """sum over calibration batches of the Frobenius norm of the error [N * L, H] (tokens in sequence order)."""
    per_seq = (err ** 2).sum(-1).view(-1, seq_len).sum(-1)
    return float(sum(per_seq[i:i + BATCH].sum().sqrt().detach() for i in range(0, per_seq.numel(), BATCH)))


def pruned_block(W, gate_up, down, x, kept, k) -> torch.Tensor:
    w = route(W, x, k, kept)
    return sum(w[:, e:e + 1] * expert_out(gate_up[e], down[e], x) for e in kept)


@torch.no_grad()
def reference_merge(block, x: torch.Tensor, kept: list[int], strength: float):
    """(assignment {d: c}, mass [E], merged {c: (gate_up, down)}) by docs/REPAIR.md's formula."""
    W, gu, dn, k = block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, block.gate.top_k
    E = W.shape[0]
    w = route(W, x, k)  # the unpruned routing
    mass = w.sum(0)
    outs = [expert_out(gu[e], dn[e], x) for e in range(E)]
    assignment = {}
    for d in range(E):
        if d in kept:
            continue
        wd = w[:, d]
        cos = []
        for c in kept:
            dot = (wd * (outs[d] * outs[c]).sum(-1)).sum()
            nd, nc = (wd * (outs[d] ** 2).sum(-1)).sum(), (wd * (outs[c] ** 2).sum(-1)).sum()
            cos.append(float(dot / (nd * nc).sqrt()) if nd * nc > 0 else 0.0)
        assignment[d] = kept[max(range(len(kept)), key=lambda j: (cos[j], -j))]
    merged = {}
    for c in kept:
        ds = [d for d, cc in assignment.items() if cc == c and mass[d] > 0]
        if not ds or strength == 0:
            continue
        total = mass[c] + strength * sum(mass[d] for d in ds)
        merged[c] = tuple(
            (mass[c] * t[c].double() + strength * sum(mass[d] * t[d].double() for d in ds)) / total for t in (gu, dn)
        )
    return assignment, mass, merged


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _one_layer_case():
    return tiny_mixtral(3, layers=1, ffn=8), calibration_ids(3, n=20, length=32)  # a case where merging pays


# --- (3) the merged weights are the documented formula, computed here ------------------------------------
def test_merge_matches_the_documented_formula(tmp_path) -> None:
    model, ids = _one_layer_case()
    out = str(tmp_path / "out")
    _, report = moe_fast.prune(copy.deepcopy(model), ids, 4, out=out, batch_size=BATCH, progress=False, repair="merge")
    rep, kept = report.layers[0].repair, report.layers[0].kept
    block = model.model.layers[0].mlp
    x, z = block_io(model, ids, 0, flat=True)
    W, gu, dn, k = block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, block.gate.top_k
    before = paper(z - pruned_block(W, gu, dn, x, kept, k), ids.shape[1])
    assert rep["loss_before"] == pytest.approx(before, rel=1e-6)
    losses = {}
    for s in merge_mod.STRENGTHS:
        assignment, mass, merged = reference_merge(block, x, kept, s)
        gu_s, dn_s = gu.detach().clone(), dn.detach().clone()
        for c, (g, d) in merged.items():
            gu_s[c], dn_s[c] = g.float(), d.float()
        losses[s] = paper(z - pruned_block(W, gu_s, dn_s, x, kept, k), ids.shape[1])
        assert rep["loss_by_strength"][str(s)] == pytest.approx(losses[s], rel=1e-6)
    assert rep["into"] == {str(d): c for d, c in assignment.items()}
    torch.testing.assert_close(torch.tensor([rep["mass"][str(e)] for e in range(8)], dtype=torch.float64), mass, rtol=1e-6, atol=1e-6)
    assert len(set(assignment.values())) > 1 or len(assignment) == 1  # not everything into one expert by accident
    best = min(losses, key=losses.get)
    assert rep["strength"] == best and not rep["reverted"], "this case is chosen so that merging pays"
    assert rep["loss_after"] == pytest.approx(losses[best], rel=1e-6) and rep["loss_after"] < rep["loss_before"]
    _, _, merged = reference_merge(block, x, kept, best)
    stock = AutoModelForCausalLM.from_pretrained(out)
    experts = stock.model.layers[0].mlp.experts
    for p, e in enumerate(kept):
        want_gu, want_dn = merged.get(e, (gu[e], dn[e]))
        torch.testing.assert_close(experts.gate_up_proj[p].double(), want_gu.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(experts.down_proj[p].double(), want_dn.double(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(experts.down_proj[p], dn[e]) for p, e in enumerate(kept))
    torch.testing.assert_close(stock.model.layers[0].mlp.gate.weight, W[kept])  # router rows left as they are


# --- (2) a dropped expert of weight zero changes nothing ------------------------------------------------------
def test_zero_strength_leaves_the_kept_experts_unchanged(tmp_path, monkeypatch) -> None:
    model, ids = _one_layer_case()
    monkeypatch.setattr(merge_mod, "STRENGTHS", (0.0,))
    out = str(tmp_path / "out")
    _, report = moe_fast.prune(copy.deepcopy(model), ids, 7, out=out, batch_size=BATCH, progress=False, repair="merge")
    rep = report.layers[0].repair
    assert rep["loss_after"] == rep["loss_before"] and rep["strength"] is None and not rep["reverted"]
    stock = AutoModelForCausalLM.from_pretrained(out)
    for p, e in enumerate(report.layers[0].kept):
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(stock.model.layers[0].mlp.experts, name)[p], getattr(model.model.layers[0].mlp.experts, name)[e])


def test_a_dropped_expert_without_routing_mass_is_not_folded_in() -> None:
    """Two dropped experts into two kept ones; the one that no token routed to leaves its kept expert
    bit for bit, the other is averaged in by mass."""
    experts = tiny_mixtral(1, layers=1, ffn=8).model.layers[0].mlp.experts
    mass = torch.tensor([3.0, 1.0, 2.0, 0.0, 0, 0, 0, 0], dtype=torch.float64)
    rows = merge_mod.merged_rows(experts, {2: 0, 3: 1}, mass, 1.0)
    assert sorted(rows) == [0]
    for name in ("gate_up_proj", "down_proj"):
        t = getattr(experts, name).detach().double()
        torch.testing.assert_close(rows[0][name].double(), (3 * t[0] + 2 * t[2]) / 5, rtol=1e-6, atol=1e-7)
    assert merge_mod.merged_rows(experts, {3: 1}, mass, 1.0) == {}
    assert merge_mod.merged_rows(experts, {2: 0}, mass, 0.0) == {}


# --- (1) the export loads in stock transformers and is the in-memory merged model ---------------------------
@pytest.mark.parametrize("family,keep", [("mixtral", 4), ("qwen3_moe", 6), ("qwen2_moe", 4), ("deepseek_v3", 8)])
@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_checkpoint_export_loads_in_stock_transformers(tmp_path, family: str, keep: int, mode: str) -> None:
    """Hub layouts (Mixtral's w1/w3/w2, Qwen's gate/up/down_proj: the merged gate_up_proj split back
    into gate and up), a shared expert and a grouped sigmoid router."""
    model = tiny_model(family)
    ids = calibration_ids(1, n=12, length=16, vocab=VOCAB)
    src = save_checkpoint(model, tmp_path / "src")
    out, plain = str(tmp_path / "out"), str(tmp_path / "plain")
    kwargs = dict(mode=mode, batch_size=BATCH, progress=False)
    _, report = moe_fast.prune(src, ids, keep, out=out, repair="merge", **kwargs)
    in_memory, mem_report = moe_fast.prune(copy.deepcopy(model), ids, keep, repair="merge", **kwargs)
    unwritten, _ = moe_fast.prune(src, ids, keep, repair="merge", **kwargs)  # no out: the source loaded whole
    moe_fast.prune(src, ids, keep, out=plain, **kwargs)
    assert report.kept == mem_report.kept
    stock = AutoModelForCausalLM.from_pretrained(out)
    expect = logits_of(in_memory, ids)
    torch.testing.assert_close(logits_of(stock, ids), expect, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_of(unwritten, ids), expect, rtol=0, atol=1e-4)
    reps = [r.repair for r in report.layers.values()]
    assert all(r["loss_after"] <= r["loss_before"] for r in reps)
    if any(r["loss_after"] < r["loss_before"] for r in reps):  # something merged: not the plain pruned model
        assert not torch.allclose(logits_of(stock, ids), logits_of(AutoModelForCausalLM.from_pretrained(plain), ids), atol=1e-5)


def test_loaded_model_export_equals_in_memory_model(tmp_path) -> None:
    model = tiny_mixtral(5, layers=2)
    ids = calibration_ids(5, n=12, length=16)
    out = str(tmp_path / "out")
    merged, report = moe_fast.prune(copy.deepcopy(model), ids, 4, out=out, batch_size=BATCH, progress=False, repair="merge")
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert stock.config.num_local_experts == 4
    torch.testing.assert_close(logits_of(stock, ids), logits_of(merged, ids), rtol=0, atol=1e-5)
    assert any(r.repair["loss_after"] < r.repair["loss_before"] for r in report.layers.values())
    with open(os.path.join(out, "moe_fast_report.json")) as f:
        saved = json.load(f)
    assert saved["settings"]["repair"] == "merge" and stock.config.moe_fast["pruning"]["repair"] == "merge"
    for i, entry in saved["layers"].items():
        assert entry["repair"]["method"] == "merge"
        assert entry["repair"]["loss_after"] == report.layers[int(i)].repair["loss_after"]


# --- (4) the reported loss never increases: a merge that does not pay is reverted -----------------------------
@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_never_increases_and_progressive_sees_the_merged_layer(tmp_path, mode: str) -> None:
    model = tiny_mixtral(3, layers=3, ffn=8)
    ids = calibration_ids(3, n=16, length=32)
    src = save_checkpoint(model, tmp_path / "src")
    out = str(tmp_path / "out")
    _, report = moe_fast.prune(src, ids, 5, out=out, mode=mode, batch_size=BATCH, progress=False, repair="merge")
    for r in report.layers.values():
        assert r.repair["loss_after"] <= r.repair["loss_before"]
        assert r.repair["reverted"] or r.repair["loss_after"] == min(r.repair["loss_by_strength"].values())
    # Layer 1's input in the run: the unpruned model's (layer-wise) or the exported, merged model's.
    stock = AutoModelForCausalLM.from_pretrained(out)
    x, _ = block_io(model if mode == "layerwise" else stock, ids, 1, flat=True)
    _, z = block_io(model, ids, 1, flat=True)
    block = model.model.layers[1].mlp
    kept = report.layers[1].kept
    e = z - pruned_block(block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, x, kept, block.gate.top_k)
    assert report.layers[1].repair["loss_before"] == pytest.approx(paper(e, ids.shape[1]), rel=1e-6)


def test_a_merge_that_does_not_pay_is_reverted(tmp_path, monkeypatch) -> None:
    model, ids = _one_layer_case()
    real = merge_mod.merged_rows

    def harmful(experts, assignment, mass, strength):  # the merge's rows, spoiled
        return {c: {n: t * 5.0 for n, t in rows.items()} for c, rows in real(experts, assignment, mass, strength).items()}

    monkeypatch.setattr(merge_mod, "merged_rows", harmful)
    out, plain = str(tmp_path / "out"), str(tmp_path / "plain")
    _, report = moe_fast.prune(copy.deepcopy(model), ids, 4, out=out, batch_size=BATCH, progress=False, repair="merge")
    moe_fast.prune(copy.deepcopy(model), ids, 4, out=plain, batch_size=BATCH, progress=False)
    rep = report.layers[0].repair
    assert rep["reverted"] and rep["loss_after"] == rep["loss_before"]
    assert all(v > rep["loss_before"] for v in rep["loss_by_strength"].values())
    a, b = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(plain)
    assert torch.equal(logits_of(a, ids), logits_of(b, ids))


# --- (5) bad input: refused before any work -------------------------------------------------------------------
def _no_forward(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the calibration stream was built: refused too late")

    monkeypatch.setattr(pipeline_mod, "HiddenStates", boom)


def test_unsupported_family_refused_before_work(tmp_path, monkeypatch) -> None:
    _no_forward(monkeypatch)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="repair='merge' is not supported for the gpt_oss family"):
        moe_fast.prune(tiny_model("gpt_oss"), calibration_ids(0, vocab=VOCAB), 4, out=out, progress=False, repair="merge")
    assert not os.path.exists(out) and not os.path.exists(out + pipeline_mod.PARTIAL_SUFFIX)


def test_merge_is_not_refused_for_the_least_squares_memory(tmp_path, monkeypatch) -> None:
    """The merge holds E x E numbers per layer: the joint system's memory check is lstsq's only."""
    monkeypatch.setattr(repair_mod, "free_bytes", lambda device: 0)
    _, report = moe_fast.prune(tiny_mixtral(0, layers=1), calibration_ids(0), 4, batch_size=BATCH, progress=False, repair="merge")
    assert report.layers[0].repair["method"] == "merge"
