"""Skipping in vLLM's compiled mode (torch.compile / inductor, no ``enforce_eager``) equals eager skipping.

vLLM 0.32 on CPU lets Dynamo trace into a MoE layer's forward; the plugin enters skipping layers
through vLLM's opaque custom op instead (``layer_hooks.opaque_entry``), so the rule and the survivors
run eagerly inside the compiled graph. Without that, compilation fails on the rule's data-dependent
steps (``int`` of the counters, ``nonzero``); with it, the compiled engine must skip the same slots
and compute only the rest (the plugin's counters), and give the eager engine's log-probs. Mixtral
(plain experts, ``moe_forward``) and Qwen2-MoE (shared experts, ``moe_forward_shared``). And the
compile cache: a skipping checkpoint's ``VllmConfig.compute_hash`` carries the plugin's factor, so a
graph compiled without the plugin (MoE inlined, no skipping) is never reused for it.
"""

from __future__ import annotations

import pytest
import torch

from families import vllm_engine, write_family_checkpoint, prompts
from skip_engine import serve_skipping

FAMILIES = ("mixtral", "qwen2_moe")
# float32 on both sides; inductor fuses the norms, rotary and activations, which moves the last bits
# (measured ~1e-6); skipping itself moves these log-probs by > 1e-2 (test_skipping_families.py).
COMPILED_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    from moe_fast.serving.skip_export import skip_checkpoint

    root = tmp_path_factory.mktemp("vllm_skip_compiled")
    batch = prompts(4, 24)
    jobs = []
    for family in FAMILIES:
        source = write_family_checkpoint(family, root / family / "source")
        calibration = root / family / "calibration.pt"
        torch.save(torch.randint(3, 96, (8, 32), generator=torch.Generator().manual_seed(1)), calibration)
        skip_dir = str(root / family / "skip")
        skip_checkpoint(source, str(calibration), skip_dir, progress=False)
        for compiled in (False, True):
            engine = vllm_engine(family) | {"enforce_eager": not compiled}
            jobs.append({"skip": skip_dir, "source": source, "prompts": batch, "engine": engine})
    results = serve_skipping(jobs)
    return {(family, compiled): results[2 * i + compiled] for i, family in enumerate(FAMILIES) for compiled in (0, 1)}


def _ok(result: dict, what: str) -> dict:
    if "error" in result:
        raise AssertionError(f"{what}: vLLM failed: {result['error'][-3000:]}")
    return result


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_engine_skips_and_computes_only_the_survivors(served, family: str) -> None:
    eager = _ok(served[(family, 0)], f"{family} eager")
    compiled = _ok(served[(family, 1)], f"{family} compiled")
    counts = {int(layer): c for layer, c in compiled["counts"].items()}
    eager_counts = {int(layer): c for layer, c in eager["counts"].items()}
    assert counts, f"{family}: the compiled engine never ran the plugin's rule (no counters)"
    assert sorted(counts) == sorted(eager_counts)
    for layer, c in counts.items():
        assert c["tokens"] == eager_counts[layer]["tokens"]
        assert 0 < c["skipped"] < c["slots"] - c["tokens"], (layer, c)
        assert c["rows_computed"] == c["slots"] - c["skipped"], f"layer {layer}: skipped slots were computed"
        assert abs(c["skipped"] - eager_counts[layer]["skipped"]) <= 1, (layer, c, eager_counts[layer])
    assert compiled["source_counts"] == {}, "the plugin acted on a checkpoint without betas"


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_engine_gives_the_eager_log_probs(served, family: str) -> None:
    eager = _ok(served[(family, 0)], f"{family} eager")
    compiled = _ok(served[(family, 1)], f"{family} compiled")
    skipping = _max_diff(compiled["batched"], eager["batched"])
    stock = _max_diff(compiled["source"], eager["source"])
    effect = _max_diff(eager["batched"], eager["source"])
    print(f"{family}: compiled vs eager, skipping {skipping:.2e}, source {stock:.2e}; skipping's effect {effect:.2e}")
    assert skipping <= COMPILED_TOLERANCE, f"{family}: compiled skipping differs from eager by {skipping:.3g}"
    assert stock <= COMPILED_TOLERANCE, f"{family}: compiled source differs from eager by {stock:.3g}"
    assert effect > 100 * COMPILED_TOLERANCE, f"{family}: skipping moved the log-probs by only {effect:.3g}"
    assert _max_diff(compiled["batched"], compiled["alone"]) <= COMPILED_TOLERANCE


def test_compile_cache_key_of_a_skipping_checkpoint_carries_the_plugin(tmp_path) -> None:
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    from moe_fast.serving.skip_export import skip_checkpoint
    from moe_fast.serving.vllm_plugin import hooks

    hooks.install()
    source = write_family_checkpoint("mixtral", tmp_path / "source")
    torch.save(torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(1)), tmp_path / "cal.pt")
    skip_dir = str(tmp_path / "skip")
    skip_checkpoint(source, str(tmp_path / "cal.pt"), skip_dir, progress=False)
    stock_hash = VllmConfig.compute_hash.__wrapped__
    for folder, skips in ((skip_dir, True), (source, False)):
        config = EngineArgs(model=folder, skip_tokenizer_init=True, dtype="float32", max_model_len=128).create_engine_config()
        assert (config.compute_hash() != stock_hash(config)) == skips, folder
        assert len(config.compute_hash()) == len(stock_hash(config))
