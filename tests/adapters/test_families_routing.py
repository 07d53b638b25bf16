"""The families routed by a RoutingSpec other than plain softmax (DeepSeek-V3, GLM-4.5, gpt-oss):
patch/unpatch against stock transformers, skipping against a plain reference, calibration,
export (loaded model and checkpoint) against the unpruned model with the dropped experts masked,
the grouped router's keep-set check, and the pruning search's refusal of a keep it cannot have."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_fast
from moe_fast import reference
from moe_fast.adapters import get_adapter
from moe_fast.pruning.export import export_checkpoint, prune_loaded_model

from helpers.routing_reference import masked_routers, reference_skip_model
from helpers.tiny_models import ROUTING_FAMILIES, VOCAB, tiny_model

# A keep set per family chosen by hand: DeepSeek keeps 2 of the 4 experts of each of its 4 groups.
KEEP = {
    "deepseek_v3": [0, 3, 5, 6, 8, 11, 13, 15],
    "glm4_moe": [0, 2, 3, 5, 6, 7],
    "gpt_oss": [1, 2, 4, 5, 7],
}
E_KEY = {"deepseek_v3": "n_routed_experts", "glm4_moe": "n_routed_experts", "gpt_oss": "num_local_experts"}


def _ids(seed: int = 0, batch: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_adapter_finds_blocks_routing_and_dense_layers(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    refs = adapter.moe_blocks(model)
    expected = [0, 1] if family == "gpt_oss" else [1, 2]  # layer 0 dense for DeepSeek / GLM
    assert [ref.layer for ref in refs] == expected
    spec = adapter.routing(refs[0].block)
    if family == "gpt_oss":
        assert spec.scoring == "softmax_topk" and spec.router_bias and not spec.renormalize
    else:
        assert spec.scoring == "sigmoid" and spec.scaling == model.config.routed_scaling_factor
        assert torch.equal(spec.selection_bias, refs[0].router.e_score_correction_bias)
        assert spec != adapter.routing(refs[1].block)  # per layer
        assert (spec.n_group, spec.topk_group) == (model.config.n_group, model.config.topk_group)


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_expert_forward_and_extra_output_rebuild_the_stock_block(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ref = adapter.moe_blocks(model)[0]
    x = torch.randn(10, model.config.hidden_size)
    with torch.no_grad():
        _, weights, ids = ref.router(x)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(ids.shape[1]):
                out[t] += weights[t, j].float() * adapter.expert_forward(ref.experts, int(ids[t, j]), x[t : t + 1])[0]
        extra = adapter.extra_output(ref.block, x)
        if extra is not None:
            out = out + extra
        stock = ref.block(x.unsqueeze(0))
        stock = stock[0] if isinstance(stock, tuple) else stock
    assert _rel(out, stock[0]) < 1e-5


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_patch_matches_stock_float32_and_unpatch_restores(family, experts_implementation):
    model = tiny_model(family, experts_implementation=experts_implementation)
    ids = _ids()
    adapter = get_adapter(model)
    router = adapter.moe_blocks(model)[0].router
    x = torch.randn(7, model.config.hidden_size)
    with torch.no_grad():
        stock = model(ids).logits
        stock_route = router(x)
        moe_fast.patch(model)
        patched = model(ids).logits
        patched_route = router(x)
        moe_fast.unpatch(model)
        after = model(ids).logits
    assert _rel(patched, stock) < 1e-5
    assert torch.equal(after, stock)
    assert model.config._experts_implementation == experts_implementation
    # the router's return contract: same logits, weights dtype, int64 indices (same experts)
    assert torch.equal(patched_route[0], stock_route[0])
    assert patched_route[1].dtype == stock_route[1].dtype and patched_route[2].dtype == torch.int64
    assert torch.equal(patched_route[2].sort(-1).values, stock_route[2].sort(-1).values)
    order_p, order_s = patched_route[2].argsort(-1), stock_route[2].argsort(-1)
    torch.testing.assert_close(patched_route[1].gather(-1, order_p), stock_route[1].gather(-1, order_s), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_patch_bfloat16_within_transformers_eager_vs_grouped_mm_gap(family):
    ids = _ids(1)
    with torch.no_grad():
        eager = tiny_model(family, dtype=torch.bfloat16, experts_implementation="eager")(ids).logits.float()
        grouped = tiny_model(family, dtype=torch.bfloat16, experts_implementation="grouped_mm")(ids).logits.float()
        patched = moe_fast.patch(tiny_model(family, dtype=torch.bfloat16, experts_implementation="eager")).model(ids).logits.float()
    gap = (eager - grouped).abs().max()
    assert (patched - eager).abs().max() <= max(2 * gap, 1e-2 * eager.abs().max())


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_skipping_matches_plain_reference_and_calibration_is_the_median(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    calib = moe_fast.calibrate_skipping(model, _ids(2, batch=4, length=24), progress=False)
    assert calib.layers == [ref.layer for ref in adapter.moe_blocks(model)]
    for rates in calib.skip_rate:
        assert all(0.3 <= r <= 0.7 for r in rates), rates
    # the betas are the medians of reference.skip_ratios under the family's spec
    ratios = {}
    hooks = [
        ref.router.register_forward_hook(
            lambda m, a, out, _l=ref.layer, _s=adapter.routing(ref.block): ratios.setdefault(_l, []).append(reference.skip_ratios(out[0], _s))
        )
        for ref in adapter.moe_blocks(model)
    ]
    with torch.no_grad():
        for batch in _ids(2, batch=4, length=24).split(4):
            model.model(input_ids=batch)
    for h in hooks:
        h.remove()
    for layer, beta in zip(calib.layers, calib.betas):
        median = torch.cat(ratios[layer]).quantile(0.5, dim=0).clamp(0, 1)
        torch.testing.assert_close(torch.tensor(beta, dtype=torch.float64), median, rtol=1e-9, atol=1e-12)

    betas = dict(zip(calib.layers, calib.betas))
    ids = _ids(3)
    with torch.no_grad():
        moe_fast.patch(model, calib)
        patched = model(ids).logits
        moe_fast.unpatch(model)
        plain = model(ids).logits
        with reference_skip_model(model, family, betas):
            expected = model(ids).logits
    assert _rel(patched, expected) < 1e-5
    assert _rel(expected, plain) > 1e-3  # the skipping changed something


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_export_of_loaded_model_loads_in_transformers_and_equals_the_masked_original(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    keep = {ref.layer: KEEP[family] for ref in adapter.moe_blocks(model)}
    ids = _ids(4)
    with torch.no_grad(), masked_routers(model, adapter, keep):
        expected = model(ids).logits
    dense_before = {k: v.clone() for k, v in model.state_dict().items() if "shared_experts" in k or ".0.mlp." in k}
    prune_loaded_model(model, adapter, keep, {"kept": {str(k): v for k, v in keep.items()}})
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config[E_KEY[family]] == len(KEEP[family])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert _rel(got, expected) < 1e-5
    state = loaded.state_dict()
    for key, value in dense_before.items():
        if family != "gpt_oss":
            assert torch.equal(state[key], value), key
    _check_sliced(loaded, family)


def _check_sliced(model, family: str) -> None:
    adapter = get_adapter(model)
    R = len(KEEP[family])
    for ref in adapter.moe_blocks(model):
        assert ref.router.weight.shape[0] == R
        if family == "gpt_oss":
            assert ref.router.bias.shape == (R,)
            assert ref.experts.gate_up_proj_bias.shape[0] == R and ref.experts.down_proj_bias.shape[0] == R
        else:
            assert ref.router.e_score_correction_bias.shape == (R,)


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_export_checkpoint_loads_in_transformers_and_equals_the_masked_original(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    source = tmp_path / "source"
    model.save_pretrained(source)
    keep = {ref.layer: KEEP[family] for ref in adapter.moe_blocks(model)}
    ids = _ids(5)
    with torch.no_grad(), masked_routers(model, adapter, keep):
        expected = model(ids).logits
    out = tmp_path / "pruned"
    export_checkpoint(str(source), str(out), get_adapter(model.config), keep, {"kept": {}})
    config = json.loads((out / "config.json").read_text())
    assert config[E_KEY[family]] == len(KEEP[family])
    if family != "gpt_oss":
        assert config["n_group"] == model.config.n_group and config["first_k_dense_replace"] == 1
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert _rel(got, expected) < 1e-5
    _check_sliced(loaded, family)
    # the selection bias kept its rows of the kept experts
    if family != "gpt_oss":
        layer = adapter.moe_blocks(model)[0].layer
        bias = model.model.layers[layer].mlp.gate.e_score_correction_bias[KEEP[family]]
        assert torch.equal(loaded.model.layers[layer].mlp.gate.e_score_correction_bias, bias)


def test_grouped_router_refuses_a_keep_set_with_unequal_groups(tmp_path):
    model = tiny_model("deepseek_v3")
    adapter = get_adapter(model)
    layers = [ref.layer for ref in adapter.moe_blocks(model)]
    uneven = [0, 1, 2, 5, 6, 8, 11, 13]  # 3, 2, 2, 1 per group of 4
    with pytest.raises(ValueError, match="same number of experts in every group"):
        prune_loaded_model(model, adapter, {layer: uneven for layer in layers})
    source = tmp_path / "source"
    model.save_pretrained(source)
    with pytest.raises(ValueError, match="same number of experts in every group"):
        export_checkpoint(str(source), str(tmp_path / "out"), adapter, {layer: uneven for layer in layers}, {})
    with pytest.raises(ValueError, match="at least 2 experts"):
        adapter.check_keep([0, 4, 8, 12])


def test_deepseek_exports_carry_the_routing_keys_vllm_reads(tmp_path):
    """transformers writes no scoring_func / topk_method for DeepSeek-V3 (it always routes by sigmoid
    with the selection bias); vLLM reads them, defaulting to softmax without the bias. Every export
    route writes them; a value the source has is kept."""
    model = tiny_model("deepseek_v3")
    adapter = get_adapter(model)
    keep = {ref.layer: KEEP["deepseek_v3"] for ref in adapter.moe_blocks(model)}
    source = tmp_path / "source"
    model.save_pretrained(source)
    assert "scoring_func" not in json.loads((source / "config.json").read_text())
    export_checkpoint(str(source), str(tmp_path / "path"), adapter, keep, {})
    moe_fast.save(prune_loaded_model(tiny_model("deepseek_v3"), adapter, keep), tmp_path / "loaded")
    for out in ("path", "loaded"):
        config = json.loads((tmp_path / out / "config.json").read_text())
        assert (config["scoring_func"], config["topk_method"]) == ("sigmoid", "noaux_tc"), out
    kept_value = tiny_model("deepseek_v3")
    kept_value.config.topk_method = "greedy"
    kept_value.save_pretrained(tmp_path / "greedy")
    export_checkpoint(str(tmp_path / "greedy"), str(tmp_path / "greedy_out"), adapter, keep, {})
    assert json.loads((tmp_path / "greedy_out" / "config.json").read_text())["topk_method"] == "greedy"
    for family in ("glm4_moe", "gpt_oss"):  # vLLM routes these from their model type alone
        assert get_adapter(tiny_model(family)).serving_config_keys() == {}


def test_pruning_search_refuses_a_keep_the_grouped_router_cannot_have():
    """DeepSeek-V3's group selection is searched over equal-per-group keep sets
    (tests/pruning/test_prune_grouped_routers.py); a keep of 7 (16 experts in 4 groups) cannot be split evenly."""
    family = "deepseek_v3"
    model = tiny_model(family)
    with pytest.raises(ValueError, match=r"keep = 7 .*same number of experts in every group, got \[2, 2, 2, 1\]"):
        moe_fast.prune(model, _ids(6, batch=2, length=8), keep=7, progress=False)


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_patched_router_weights_under_autograd_equal_the_kernel_weights(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    moe_fast.patch(model, 0.9)
    router = adapter.moe_blocks(model)[0].router
    x = torch.randn(9, model.config.hidden_size)
    with torch.no_grad():
        _, plain, ids = router(x)
    logits, weights, ids_grad = router(x.requires_grad_())
    assert weights.requires_grad and torch.equal(ids_grad, ids) and (ids == adapter.num_experts).any()
    torch.testing.assert_close(weights, plain, rtol=1e-6, atol=1e-7)
    weights.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_skipping_model_saves_and_loads_patched(family, tmp_path):
    model = tiny_model(family)
    ids = _ids(7)
    calib = moe_fast.calibrate_skipping(model, ids, progress=False)
    moe_fast.patch(model, calib)
    with torch.no_grad():
        want = model(ids).logits
    out = moe_fast.save(model, tmp_path / "skip")
    loaded = moe_fast.from_pretrained(out)
    assert moe_fast.serving.patching.current_betas(loaded) == dict(zip(calib.layers, calib.betas))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers still loads it
    with torch.no_grad():
        got = loaded(ids).logits
        with reference_skip_model(plain, family, dict(zip(calib.layers, calib.betas))):
            ref = plain(ids).logits
    assert _rel(got, want) < 1e-6
    assert _rel(got, ref) < 1e-5
