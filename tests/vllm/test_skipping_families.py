"""Dynamic skipping inside vLLM (moe_fast's plugin) equals moe_fast's skipping in transformers, for every family.

On a skipping export of each family (``moe_fast.skip_export.skip_checkpoint``, what ``moe-fast skip``
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
from families import prompts, write_family_checkpoint
from skip_engine import serve_skipping

# Families whose skipping export vLLM serves here in float32, as transformers runs it. Not here:
# DeepSeek-V3: on CPUs with AMX vLLM 0.32 picks its AMX MLA attention, which refuses float32
# weights; its plain CPU MLA backend (attention_backend="CPU_MLA") serves the *unskipped* tiny model
# 2.6 nats away from transformers, and in bfloat16 a batched prompt up to 5 nats from itself alone
# (skipping or not), so no comparison can be made. gpt-oss: no unquantized CPU expert backend for
# its activation; the MXFP4 one takes bfloat16 only and then wants a tokenizer. Their rule is tested on engine-shaped router output
# (tests/test_vllm_skip_rule.py). MOE_FAST_VLLM_SKIP_FAMILIES=a,b runs others (e.g. to retry them).
SKIP_FAMILIES = os.environ.get("MOE_FAST_VLLM_SKIP_FAMILIES", "mixtral,qwen2_moe,qwen3_moe,olmoe,glm4_moe").split(",")
# Engine settings per family over engine.py's ENGINE_DEFAULTS (float32, eager).
ENGINE = {"deepseek_v3": {"dtype": "bfloat16"}, "gpt_oss_mxfp4": {"dtype": "bfloat16"}}
GAP_FLOOR = 1e-4  # vLLM's float32 kernels against transformers' on these tiny models: ~1e-6 (DeepSeek MLA ~1e-2)


def write_servable(family: str, path) -> str:
    """The family's vLLM-servable tiny checkpoint; DeepSeek-V3 says ``scoring_func: sigmoid`` as the
    real checkpoints do (without it vLLM routes it by softmax, which the plugin refuses)."""
    if family == "gpt_oss_mxfp4":
        from families import write_mxfp4_family_checkpoint

        return write_mxfp4_family_checkpoint(path)
    folder = write_family_checkpoint(family, path)
    if family == "deepseek_v3":
        cfg_path = os.path.join(folder, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["scoring_func"] = "sigmoid"
        json.dump(cfg, open(cfg_path, "w"), indent=2)
    return folder


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
    from moe_fast.skip_export import skip_checkpoint

    root = tmp_path_factory.mktemp("vllm_skip")
    batch = prompts(4, 24)  # lengths 24, 23, 22, 21
    jobs, sides = [], {}
    for family in SKIP_FAMILIES:
        source = write_servable(family, root / family / "source")
        calibration = root / family / "calibration.pt"
        torch.save(torch.randint(3, 96, (8, 32), generator=torch.Generator().manual_seed(1)), calibration)
        skip_dir = str(root / family / "skip")
        skip_checkpoint(source, str(calibration), skip_dir, progress=False)
        jobs.append({"skip": skip_dir, "source": source, "prompts": batch, "engine": ENGINE.get(family, {})})
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
    gap = max_abs_diff(result["source"], side["plain"])  # the family's vLLM-vs-transformers gap, unskipped
    tolerance = max(2 * gap, GAP_FLOOR)
    diff = max_abs_diff(result["batched"], side["skip"])
    effect = max_abs_diff(result["batched"], side["plain"])  # what skipping changes
    print(f"{family}: unskipped gap {gap:.2e}, skipping gap {diff:.2e}, skipping's effect {effect:.2e}")
    assert diff <= tolerance, f"{family}: vLLM skipping differs from moe_fast's by {diff:.3g} (tolerance {tolerance:.3g})"
    assert effect > 20 * tolerance, f"{family}: skipping changed the log-probs by only {effect:.3g}"


@pytest.mark.parametrize("family", SKIP_FAMILIES)
def test_vllm_skips_the_same_slots_and_computes_only_the_rest(served, family: str) -> None:
    result, side = _get(served, family)
    counts = {int(layer): c for layer, c in result["counts"].items()}
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

    from moe_fast.skip_export import skip_checkpoint

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
