"""moe_fast.patch / unpatch / save / from_pretrained and the moe_fast experts implementation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import moe_fast
from moe_fast.serving.experts import moe_fast_experts_forward
from helpers.reference_blocks import reference_forward, rel_err, tie_free_ids
from helpers.tiny_models import VOCAB, moe_blocks, tiny_model


def _ids(b=2, s=16):
    return torch.randint(3, VOCAB, (b, s))


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_bf16_within_twice_transformers_own_gap(family):
    # Tied bf16 logits are ordered by a convention (ours: lower expert first; torch.topk: unspecified).
    model = tiny_model(family, torch.bfloat16, experts_implementation="eager")
    ids = tie_free_ids(model)
    with torch.no_grad():
        eager = model(ids).logits.float()
        model.set_experts_implementation("grouped_mm")
        grouped = model(ids).logits.float()
        moe_fast.patch(model)
        ours = model(ids).logits.float()
    gap = (eager - grouped).abs().max()
    assert (ours - eager).abs().max() <= 2 * gap


def test_patch_is_idempotent_and_unpatch_restores():
    model = tiny_model("mixtral")
    ids = _ids()
    router = model.model.layers[0].mlp.gate
    stock_forward = router.forward
    model.config.moe_fast = {"pruning": {"kept_experts": "whatever"}}  # pruning's record survives
    with torch.no_grad():
        stock = model(ids).logits
        moe_fast.patch(model, betas=0.5)
        once = model(ids).logits
        moe_fast.patch(model, betas=0.5)
        twice = model(ids).logits
        moe_fast.patch(model)  # a second call changes the betas
        no_skip = model(ids).logits
        moe_fast.unpatch(model)
        moe_fast.unpatch(model)  # no-op
        back = model(ids).logits
    assert torch.equal(once, twice)
    assert rel_err(no_skip, stock) < 1e-5
    assert torch.equal(back, stock)
    assert router.forward.__func__ is stock_forward.__func__
    assert model.config._experts_implementation == "grouped_mm"
    assert model.config.moe_fast == {"pruning": {"kept_experts": "whatever"}}


def test_router_logits_and_aux_loss_unchanged():
    model = tiny_model("mixtral")
    ids = _ids()
    with torch.no_grad():
        stock = model(ids, labels=ids, output_router_logits=True)
        moe_fast.patch(model)
        ours = model(ids, labels=ids, output_router_logits=True)
        moe_fast.patch(model, betas=0.6)
        skipping = model(ids, labels=ids, output_router_logits=True)
    assert len(ours.router_logits) == len(stock.router_logits) == 2
    for a, b in zip(ours.router_logits, stock.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.aux_loss, stock.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(skipping.router_logits[0], stock.router_logits[0], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(skipping.aux_loss)


def test_gradients_match_stock():
    ids = _ids()
    grads = []
    for patched in (False, True):
        model = tiny_model("mixtral", experts_implementation="eager")
        if patched:
            moe_fast.patch(model)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def _loop_experts(experts, x, idx, w):
    """Plain per-slot loop; index E contributes nothing."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e == experts.num_experts:
                continue
            gate, up = F.linear(x[t], experts.gate_up_proj[e]).chunk(2)
            out[t] += float(w[t, j]) * F.linear(experts.act_fn(gate) * up, experts.down_proj[e]).double()
    return out


def test_experts_skip_index_E_and_plan_from_router_or_indices():
    model = tiny_model("mixtral")
    block = model.model.layers[0].mlp
    E = block.experts.num_experts
    x = torch.randn(9, model.config.hidden_size)
    idx = torch.randint(0, E, (9, 2))
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % E, idx[:, 1])
    idx[::2, 1] = E  # skipped slots
    idx[3, 0] = 5
    w = torch.rand(9, 2)
    with torch.no_grad():
        got = moe_fast_experts_forward(block.experts, x, idx, w)
        want = _loop_experts(block.experts, x, idx, w)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        # The plan the patched router puts in its channel is used for its own indices only.
        moe_fast.patch(model, betas=0.7)
        _, scores, indices = block.gate(x)
        from_router = moe_fast_experts_forward(block.experts, x, indices, scores)
        block.gate(x)  # puts a plan for other (equal-valued) indices
        rebuilt = moe_fast_experts_forward(block.experts, x, indices.clone(), scores)
        want = _loop_experts(block.experts, x, indices, scores)
    assert (indices == E).any()
    torch.testing.assert_close(from_router.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(rebuilt, from_router)


@pytest.mark.parametrize(
    "betas, match",
    [
        (-0.1, r"\[0, 1\]"),
        (1.5, r"\[0, 1\]"),
        (float("nan"), r"\[0, 1\]"),
        ([0.5, 0.5, 0.5], "3 betas but the model has 2 MoE layers"),
        ([0.5, [0.2, 0.3]], "k - 1 = 1 betas"),
        ({7: 0.5}, "not MoE layers"),
        (["x", 0.5], "number"),
    ],
)
def test_bad_betas(betas, match):
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match=match):
        moe_fast.patch(model, betas=betas)
    assert not hasattr(model, "_moe_fast_patch")


def test_calibration_ignores_existing_skipping():
    model = tiny_model("mixtral")
    ids = _ids(3)
    first = moe_fast.calibrate_skipping(model, ids, progress=False)
    moe_fast.patch(model, betas=first)
    second = moe_fast.calibrate_skipping(model, ids, progress=False)
    flat = [b for layer in first.betas for b in layer]
    assert [b for layer in second.betas for b in layer] == pytest.approx(flat, rel=1e-5)  # without skipping
    assert model.model.layers[0].mlp.gate._moe_fast.beta == first.betas[0]  # still skipping afterwards


def test_save_and_from_pretrained_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2_moe")
    ids = _ids()
    cal = moe_fast.calibrate_skipping(model, ids, progress=False)
    moe_fast.patch(model, betas=cal)
    with torch.no_grad():
        want = model(ids).logits
    out = moe_fast.save(model, tmp_path / "skip")
    config = json.loads((out / "config.json").read_text())
    assert config["moe_fast"]["skipping"]["betas"] == cal.betas
    assert config["moe_fast"]["skipping"]["layers"] == [0, 2]  # layer 1 is dense
    assert config["moe_fast"]["skipping"]["quantile"] == 0.5
    with pytest.raises(FileExistsError):
        moe_fast.save(model, out)

    loaded = moe_fast.from_pretrained(out)
    assert loaded.model.layers[2].mlp.gate._moe_fast.beta == cal.betas[1]
    plain = AutoModelForCausalLM.from_pretrained(out)  # stock transformers still loads it
    with torch.no_grad():
        got = loaded(ids).logits
        with reference_forward(plain, dict(zip(cal.layers, cal.betas))):
            ref = plain(ids).logits
    assert rel_err(got, want) < 1e-6
    assert rel_err(got, ref) < 1e-5


def test_transformers_from_pretrained_with_moe_fast_experts(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("olmoe")
    ids = _ids()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        want = model(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_fast")
        assert loaded.config._experts_implementation == "moe_fast"
        got = loaded(ids).logits
    assert rel_err(got, want) < 1e-5


def test_blocks_found_by_adapter_match_the_model():
    from moe_fast.adapters import get_adapter

    for family in ["mixtral", "qwen2_moe"]:
        model = tiny_model(family)
        assert [r.layer for r in get_adapter(model).moe_blocks(model)] == [i for i, _ in moe_blocks(model)]


def test_import_registers_experts_implementation_without_importing_transformers():
    import subprocess
    import sys

    code = (
        "import sys, moe_fast\n"
        "assert 'transformers' not in sys.modules, 'import moe_fast pulled in transformers'\n"
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
        "assert 'moe_fast' in ALL_EXPERTS_FUNCTIONS\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_explicit_register_makes_the_implementation_selectable():
    """moe_fast.register() (the explicit form of what import does lazily) puts the name in transformers."""
    from transformers.integrations.moe import ExpertsInterface

    from moe_fast.serving.experts import NAME, moe_fast_experts_forward

    ExpertsInterface._global_mapping.pop(NAME, None)
    assert NAME not in ExpertsInterface._global_mapping
    moe_fast.register()
    assert ExpertsInterface._global_mapping[NAME] is moe_fast_experts_forward
