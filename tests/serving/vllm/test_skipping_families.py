"""Dynamic skipping inside vLLM (moe_fast's plugin) equals moe_fast's skipping in transformers, for every family.

On a skipping export of each family (``moe_fast.serving.skip_export.skip_checkpoint``, what ``moe-fast skip``
writes, betas at the median): vLLM's teacher-forced prompt log-probs equal
``moe_fast.from_pretrained``'s (skipping on) within the family's vLLM-vs-transformers gap (measured
here on the source checkpoint) and differ from the unskipped model by far more; vLLM's skipped slots
per layer equal moe_fast's on the same tokens; the expert rows vLLM computes are exactly the
unskipped slots; each prompt of a batch of different lengths gets the log-probs it gets alone; a
checkpoint without betas leaves the plugin idle. Bad records fail at load time with one error.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from engine import Job, load_hf, max_abs_diff, run_vllm
from families import VLLM_DTYPE, prompts, vllm_engine, write_family_checkpoint
from gaps import SKIP_GAPS
from skip_engine import serve_skipping

# Every family whose skipping export vLLM 0.32's CPU build serves: all of moe_fast's, gpt-oss in MXFP4
# (its unquantized experts have no CPU backend: tests/serving/vllm/test_vllm_export.py). DeepSeek-V3 in
# float32 with families.VLLM_ENGINE's settings (CPU MLA attention, vLLM's PyTorch rotary embedding);
# gpt-oss MXFP4 in bfloat16 (its only CPU expert backend). MOE_FAST_VLLM_SKIP_FAMILIES=a,b runs a subset.
ALL_SKIP_FAMILIES = "mixtral,qwen2_moe,qwen3_moe,olmoe,glm4_moe,deepseek_v3,gpt_oss_mxfp4"
SKIP_FAMILIES = os.environ.get("MOE_FAST_VLLM_SKIP_FAMILIES", ALL_SKIP_FAMILIES).split(",")
GAP_FLOOR = 1e-4  # vLLM's float32 kernels against transformers' on these tiny models: ~1e-6
# The families served in bfloat16 (families.VLLM_DTYPE) against moe_fast in float32: vLLM's bfloat16
# moves most positions by ~1e-2 (measured unskipped gap on gpt-oss MXFP4: max 0.025, q90 6e-3), and
# where two router logits are within bfloat16's reach of each other (e.g. a 2nd/3rd expert margin of
# 0.011) vLLM picks the other expert, which moves that position by ~0.1 (measured 0.087 at 1 of 86
# positions of the skipping export; moe_fast in bfloat16 stays within 0.01 there). So for them the
# typical position (TYPICAL_QUANTILE) is held to 2 x the unskipped model's typical gap, at most
# ROUTING_FLIPS positions may exceed 2 x its max gap, none by more than ROUTING_FLIP_LIMIT, and
# skipping must move the typical position by BF16_EFFECT_FACTOR x the typical tolerance.
TYPICAL_QUANTILE = 0.9
ROUTING_FLIPS = 2
ROUTING_FLIP_LIMIT = 0.25
BF16_EFFECT_FACTOR = 10


def write_servable(family: str, path) -> str:
    """The family's vLLM-servable tiny checkpoint (families.py; gpt_oss_mxfp4: gpt-oss in MXFP4)."""
    if family == "gpt_oss_mxfp4":
        from families import write_mxfp4_family_checkpoint

        return write_mxfp4_family_checkpoint(path)
    return write_family_checkpoint(family, path)


def _positions(a: list[list[float]], b: list[list[float]]) -> list[float]:
    """Sorted per-position |a - b| over all prompts (equal shapes asserted)."""
    assert [len(x) for x in a] == [len(y) for y in b], "different prompt lengths"
    return sorted(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def _quantile(values: list[float], q: float) -> float:
    return values[min(int(q * len(values)), len(values) - 1)]


def moe_fast_side(skip_dir: str, source_dir: str, batch: list[list[int]]) -> dict:
    """transformers: moe_fast.from_pretrained (skipping on) and the plain source; skipped slots per layer."""
    import moe_fast
    from moe_fast.adapters import get_adapter

    skipping = moe_fast.from_pretrained(skip_dir, dtype=torch.float32).eval()
    plain = load_hf(source_dir)
    adapter = get_adapter(skipping)
    num_experts = int(adapter.moe_blocks(skipping)[0].router.weight.shape[0])
    skipped: dict[int, int] = {}

    def counter(layer: int):
        def hook(module, args, output):
            skipped[layer] = skipped.get(layer, 0) + int((output[2] == num_experts).sum())
        return hook

    handles = [ref.router.register_forward_hook(counter(ref.layer)) for ref in adapter.moe_blocks(skipping)]
    out = {"skip": [], "plain": []}
    with torch.no_grad():
        for prompt in batch:
            ids = torch.tensor([prompt])
            for name, model in (("skip", skipping), ("plain", plain)):
                logp = model(ids).logits[0, :-1].float().log_softmax(-1)
                out[name].append(logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    for h in handles:
        h.remove()
    out["skipped"] = skipped
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """Every family's skipping export served by vLLM (one child process) and run by moe_fast."""
    from moe_fast.serving.skip_export import skip_checkpoint

    root = tmp_path_factory.mktemp("vllm_skip")
    batch = prompts(4, 24)  # lengths 24, 23, 22, 21
    jobs, sides = [], {}
    for family in SKIP_FAMILIES:
        source = write_servable(family, root / family / "source")
        calibration = root / family / "calibration.pt"
        torch.save(torch.randint(3, 96, (8, 32), generator=torch.Generator().manual_seed(1)), calibration)
        skip_dir = str(root / family / "skip")
        skip_checkpoint(source, str(calibration), skip_dir, progress=False)
        jobs.append({"skip": skip_dir, "source": source, "prompts": batch, "engine": vllm_engine(family)})
        sides[family] = moe_fast_side(skip_dir, source, batch)
    results = serve_skipping(jobs)
    return {family: (result, sides[family]) for family, result in zip(SKIP_FAMILIES, results)}


def _get(served: dict, family: str) -> tuple[dict, dict]:
    result, side = served[family]
    if "error" in result:
        raise AssertionError(f"{family}: vLLM failed: {result['error']}")
    return result, side


@pytest.mark.parametrize("family", SKIP_FAMILIES)
def test_vllm_skipping_equals_moe_fast_within_the_family_gap(served, family: str) -> None:
    result, side = _get(served, family)
    gap = _positions(result["source"], side["plain"])  # the family's vLLM-vs-transformers gap, unskipped
    diff = _positions(result["batched"], side["skip"])
    effect = _positions(result["batched"], side["plain"])  # what skipping changes
    tolerance = max(2 * gap[-1], GAP_FLOOR)
    print(f"{family}: unskipped gap max {gap[-1]:.2e} q90 {_quantile(gap, TYPICAL_QUANTILE):.2e}; "
          f"skipping gap max {diff[-1]:.2e} q90 {_quantile(diff, TYPICAL_QUANTILE):.2e}; "
          f"skipping's effect max {effect[-1]:.2e} q90 {_quantile(effect, TYPICAL_QUANTILE):.2e}")
    SKIP_GAPS.setdefault(family, {}).update(
        {name: (d[-1], _quantile(d, TYPICAL_QUANTILE)) for name, d in (("gap", gap), ("skipping_gap", diff), ("effect", effect))}
    )
    if family not in VLLM_DTYPE:
        assert diff[-1] <= tolerance, f"{family}: vLLM skipping differs from moe_fast's by {diff[-1]:.3g} (tolerance {tolerance:.3g})"
        assert effect[-1] > 20 * tolerance, f"{family}: skipping changed the log-probs by only {effect[-1]:.3g}"
        return
    typical_tolerance = max(2 * _quantile(gap, TYPICAL_QUANTILE), GAP_FLOOR)
    typical = _quantile(diff, TYPICAL_QUANTILE)
    assert typical <= typical_tolerance, f"{family}: typical skipping gap {typical:.3g} > {typical_tolerance:.3g}"
    flips = [d for d in diff if d > tolerance]
    assert len(flips) <= ROUTING_FLIPS and diff[-1] <= ROUTING_FLIP_LIMIT, (
        f"{family}: {len(flips)} positions beyond {tolerance:.3g} (largest {diff[-1]:.3g}); at most {ROUTING_FLIPS} "
        f"routing flips of at most {ROUTING_FLIP_LIMIT} allowed"
    )
    typical_effect = _quantile(effect, TYPICAL_QUANTILE)
    assert typical_effect > BF16_EFFECT_FACTOR * typical_tolerance, f"{family}: skipping moved a typical position by only {typical_effect:.3g}"
    assert effect[-1] > 4 * tolerance, f"{family}: skipping changed the log-probs by only {effect[-1]:.3g}"


@pytest.mark.parametrize("family", SKIP_FAMILIES)
def test_vllm_skips_the_same_slots_and_computes_only_the_rest(served, family: str) -> None:
    result, side = _get(served, family)
    counts = {int(layer): c for layer, c in result["counts"].items()}
    SKIP_GAPS.setdefault(family, {})["skipped"] = [(c["skipped"], side["skipped"].get(layer)) for layer, c in sorted(counts.items())]
    assert sorted(counts) == sorted(side["skipped"]), "vLLM skipped in other layers than moe_fast"
    tokens = sum(len(p) for p in prompts(4, 24))
    for layer, c in counts.items():
        assert c["tokens"] == tokens
        assert c["rows_computed"] == c["slots"] - c["skipped"], f"layer {layer}: skipped slots were computed"
        assert 0 < c["skipped"] < c["slots"] - c["tokens"]
        # Same tokens, same rule: equal counts (one slot of slack per layer for a ratio at the threshold
        # that the engines' float32 kernels put on opposite sides).
        assert abs(c["skipped"] - side["skipped"][layer]) <= 1, (layer, c["skipped"], side["skipped"][layer])
    assert result["source_counts"] == {}, "the plugin acted on a checkpoint without betas"


@pytest.mark.parametrize("family", SKIP_FAMILIES)
def test_batched_prompts_of_different_lengths_get_what_they_get_alone(served, family: str) -> None:
    result, _ = _get(served, family)
    assert len({len(p) for p in result["batched"]}) == 4
    assert max_abs_diff(result["batched"], result["alone"]) <= 1e-4


def _rewrite_record(src: str, dst, change) -> str:
    """A copy of checkpoint ``src`` whose config.json ``change(config)`` edited."""
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    config = json.load(open(path))
    change(config)
    json.dump(config, open(path, "w"), indent=2)
    return str(dst)


def test_bad_records_fail_at_load_with_one_clear_error(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from moe_fast.serving.skip_export import skip_checkpoint

    source = write_servable("mixtral", tmp_path / "source")
    torch.save(torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(1)), tmp_path / "cal.pt")
    skip_dir = str(tmp_path / "skip")
    skip_checkpoint(source, str(tmp_path / "cal.pt"), skip_dir, progress=False)
    record = json.load(open(os.path.join(skip_dir, "config.json")))["moe_fast"]
    bad_beta = _rewrite_record(skip_dir, tmp_path / "bad_beta", lambda c: c["moe_fast"]["skipping"].update(betas=[[1.5], [0.2]]))
    version = _rewrite_record(skip_dir, tmp_path / "version", lambda c: c["moe_fast"]["skipping"].update(version=99))
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32))
    dense.config.moe_fast = record
    dense.save_pretrained(tmp_path / "dense")
    cases = {bad_beta: "must be in [0, 1]", version: "record version 99", str(tmp_path / "dense"): "not a family"}
    results = run_vllm([Job(path, [[5, 6, 7]]) for path in cases])
    for (path, words), r in zip(cases.items(), results):
        assert "error" in r, f"{path} was served"
        assert r["error"].startswith("SkipRecordError") and f"{path}/config.json" in r["error"] and words in r["error"], r["error"]
