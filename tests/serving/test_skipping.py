"""calibrate_skipping: betas are quantiles of w_j / w_0 over the calibration tokens, per slot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_fast
from helpers.tiny_models import VOCAB, moe_blocks, tiny_model


def captured_ratios(model, ids) -> dict[int, np.ndarray]:
    """w_j / w_0 (j = 1..k-1) of every token, from the stock model's router logits."""
    got: dict[int, list] = {}

    def hook(layer):
        def fn(module, args, out):
            probs = torch.softmax(out[0].double(), dim=-1)
            top = torch.sort(probs, dim=-1, descending=True).values[:, : module.top_k]
            got.setdefault(layer, []).append((top[:, 1:] / top[:, :1]).numpy())

        return fn

    handles = [block.gate.register_forward_hook(hook(layer)) for layer, block in moe_blocks(model)]
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in handles:
        h.remove()
    return {layer: np.concatenate(v) for layer, v in got.items()}


@pytest.mark.numerics
@pytest.mark.parametrize("family, q", [("mixtral", 0.5), ("qwen2_moe", 0.3), ("qwen3_moe", 0.5), ("olmoe", 0.7)])
def test_betas_are_quantiles_per_slot(family, q):
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (5, 12))
    cal = moe_fast.calibrate_skipping(model, ids, quantile=q, batch_size=2, progress=False)
    ratios = captured_ratios(model, ids)
    k = model.config.num_experts_per_tok
    assert cal.layers == sorted(ratios)
    assert cal.num_tokens == ids.numel() and cal.top_k == k and cal.quantile == q
    for layer, betas, rates in zip(cal.layers, cal.betas, cal.skip_rate):
        r = ratios[layer]
        assert len(betas) == k - 1
        for j in range(k - 1):
            want = float(np.quantile(r[:, j], q))
            assert betas[j] == pytest.approx(want, rel=1e-6)
            assert rates[j] == pytest.approx(float((r[:, j] < want).mean()))
            assert abs(rates[j] - q) <= 1.5 / len(r)
    assert cal.saved_fraction == pytest.approx([sum(r) / k for r in cal.skip_rate])
    assert str(cal.layers[-1]) in cal.table()


@pytest.mark.numerics
def test_reported_skip_rate_is_what_the_patched_model_skips():
    model = tiny_model("mixtral")
    ids = torch.randint(3, VOCAB, (4, 12))
    cal = moe_fast.calibrate_skipping(model, ids, progress=False)
    moe_fast.patch(model, betas=cal)
    first_layer = moe_blocks(model)[0][1]
    seen = []
    h = first_layer.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    with torch.no_grad():
        model(ids)
    h.remove()
    idx = seen[0]
    skipped = (idx[:, 1] == model.config.num_local_experts).double().mean()
    # The first sparse layer sees the same input as during calibration.
    assert float(skipped) == pytest.approx(cal.skip_rate[0][0], abs=1e-9)


def test_bad_calibration_arguments():
    model = tiny_model("mixtral")
    ids = torch.randint(3, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="quantile"):
        moe_fast.calibrate_skipping(model, ids, quantile=1.0)
    with pytest.raises(ValueError, match="token ids"):
        moe_fast.calibrate_skipping(model, "not ids")
    with pytest.raises(ValueError, match="integer ids"):
        moe_fast.calibrate_skipping(model, torch.rand(2, 8))
    one = tiny_model("mixtral", num_experts_per_tok=1)
    with pytest.raises(ValueError, match="top-k is 1"):
        moe_fast.calibrate_skipping(one, ids)


def test_cli_skip_writes_a_checkpoint_that_loads_with_skipping(tmp_path):
    from moe_fast.cli import main
    from helpers.reference_blocks import reference_forward

    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(3, VOCAB, (4, 12))
    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "skip"
    assert main(["skip", str(tmp_path / "model"), "--calib", str(tmp_path / "ids.pt"), "--out", str(out),
                 "--quantile", "0.4", "--no-progress"]) == 0
    assert (out / "model.safetensors").exists() and (out / "moe_fast_skip.json").exists()
    want = moe_fast.calibrate_skipping(model, ids, quantile=0.4, progress=False)
    loaded = moe_fast.from_pretrained(out)
    record = loaded.config.moe_fast["skipping"]
    for got_b, want_b in zip(record["betas"], want.betas):
        assert got_b == pytest.approx(want_b, rel=1e-6)
    with torch.no_grad():
        got = loaded(ids).logits
        with reference_forward(model, dict(zip(want.layers, want.betas))):
            ref = model(ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    # A second run into the same, non-empty directory is refused; --out MODEL rewrites config.json only.
    assert main(["skip", str(out), "--calib", str(tmp_path / "ids.pt"), "--out", str(tmp_path / "model"),
                 "--no-progress"]) == 2
    assert main(["skip", str(out), "--calib", str(tmp_path / "ids.pt"), "--out", str(out), "--quantile", "0.6",
                 "--no-progress"]) == 0
    assert moe_fast.from_pretrained(out).config.moe_fast["skipping"]["quantile"] == 0.6


def test_skip_checkpoint_in_place_on_a_pruned_checkpoint(tmp_path):
    """What ``moe-fast prune ... --skip`` runs after writing the pruned checkpoint."""
    from moe_fast.serving.skip_export import skip_checkpoint
    from helpers.reference_blocks import reference_forward

    model = tiny_model("qwen2_moe")
    ids = torch.randint(3, VOCAB, (4, 12))
    out = tmp_path / "pruned"
    moe_fast.prune(model, ids, 6, out=out, batch_size=2, progress=False)
    report = skip_checkpoint(out, ids, out, quantile=0.5, progress=False)
    loaded = moe_fast.from_pretrained(out)
    assert set(loaded.config.moe_fast) == {"pruning", "skipping"}
    assert loaded.config.num_experts == 6
    betas = dict(zip(report["layers"], report["betas"]))
    with torch.no_grad():
        got = loaded(ids).logits
        moe_fast.unpatch(loaded)
        assert set(loaded.config.moe_fast) == {"pruning"}
        with reference_forward(loaded, betas):
            ref = loaded(ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
