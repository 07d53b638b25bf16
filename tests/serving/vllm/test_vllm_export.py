"""Every family's pruned export served by vLLM gives transformers' teacher-forced log-probs on it,
and the shipped models generate the same greedy tokens in vLLM as in transformers, unpruned and pruned.

vLLM's kernels differ from transformers' by a family-specific amount even on an unpruned checkpoint
(the bfloat16-only gpt-oss MXFP4 more than the float32 ones), so each
family's pruned gap is held to its own unpruned gap: max(2 x unpruned gap, FLOOR), for the max over
positions and for a typical position (see ROUTING_FLIP_FLOOR). Every checkpoint of the module is served in one
child process (engine.run_vllm), one engine after another, to pay vLLM's import once.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import engine
from families import FAMILIES, HF_DTYPE, KEEP, prompts, vllm_engine, write_family_checkpoint
from gaps import GAPS

pytestmark = pytest.mark.usefixtures("one_thread")

# Float32 on both sides: differences of summation order stay far below this (measured ~1e-6 on
# the softmax families); the unpruned gap sets the bound wherever it is larger.
FLOOR = 1e-4
# An unpruned gap above this means vLLM does not serve the family as transformers runs it.
UNPRUNED_LIMIT = 0.1
# gpt-oss MXFP4, which vLLM 0.32's CPU build serves only in bfloat16 (families.VLLM_DTYPE; transformers
# runs it in bfloat16 too, on a checkpoint conditioned for it: families.py): most positions then agree
# to ~2e-2 nats, but bfloat16's ~1% error on the router input flips a top-k choice at a few positions
# (which ones differing between transformers' own float32 and bfloat16), and such a position moves by
# 0.1 to 0.5 nats (measured unpruned max gap 0.12). So its max gap is held to max(2 x unpruned,
# ROUTING_FLIP_FLOOR), and the typical gap (TYPICAL_QUANTILE of the per-position gaps, which an export
# bug moves at many positions) to max(2 x unpruned, FLOOR) as every family's. DeepSeek-V3 is served in
# float32 (families.VLLM_ENGINE) and held to FLOOR like the others.
KNOWN_LARGE_GAP = {"gpt_oss_mxfp4": 1.0}
ROUTING_FLIP_FLOOR = {"gpt_oss_mxfp4": 1.0}
TYPICAL_QUANTILE = 0.9
# The prune must change the model, and vLLM must serve the export, not its source, by at least this.
PRUNE_CHANGES_AT_LEAST = 1e-2
# vLLM 0.32's CPU build has no experts kernel for unquantized gpt-oss (biases, clamped SwiGLU): it
# refuses the unpruned checkpoint and the export alike with this error; gpt-oss is served in MXFP4.
UNSERVED = {"gpt_oss": "No Unquantized MoE backend supports the deployment configuration"}
CHECKPOINTS = FAMILIES + ["gpt_oss_mxfp4"]
# The shipped models (builtin:NAME), pruned on the built-in corpus: name -> experts kept.
SHIPPED = {"small-mixtral": 6, "small-qwen3-moe": 24}
GREEDY_TOKENS = 16
TEXTS = ["def fibonacci(n):\n    if n < 2:", "The river ran past the old mill and", "for i in range(10):\n   ", "Once upon a time"]


def _calibration(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (8, 16), generator=torch.Generator().manual_seed(1))


def _write_source(name: str, folder) -> str:
    if name == "gpt_oss_mxfp4":
        from families import write_mxfp4_family_checkpoint

        return write_mxfp4_family_checkpoint(folder)
    return write_family_checkpoint(name, folder)


def _shipped(root) -> tuple[dict[str, dict[str, str]], dict[str, list[list[int]]]]:
    """The shipped models and their pruned exports (paths), and each one's tokenized TEXTS."""
    from transformers import AutoTokenizer

    import moe_fast
    from moe_fast.models import resolve_model

    paths, ids = {}, {}
    for name, keep in SHIPPED.items():
        src = resolve_model(f"builtin:{name}")
        tokenizer = AutoTokenizer.from_pretrained(src)
        out = str(root / name / "pruned")
        calibration = moe_fast.load_calibration("builtin:python-prose", tokenizer, n_samples=8, seq_len=64)
        moe_fast.prune(src, calibration, keep, out=out, batch_size=4, progress=False, return_model=False)
        paths[name] = {"src": src, "pruned": out}
        ids[name] = [tokenizer(text)["input_ids"] for text in TEXTS]
    return paths, ids


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, dict]:
    """name -> {"src"|"pruned": {"path", "vllm": result dict, "hf": log-probs[, "hf_greedy"]}} for
    every family's tiny checkpoint (full-vocabulary log-probs) and every shipped model (the prompt
    tokens' log-probs and greedy tokens)."""
    import moe_fast

    root = tmp_path_factory.mktemp("vllm_export")
    paths: dict[str, dict[str, str]] = {}
    for name in CHECKPOINTS:
        family = "gpt_oss" if name == "gpt_oss_mxfp4" else name
        src = _write_source(name, root / name / "src")
        out = str(root / name / "pruned")
        with torch.random.fork_rng():
            moe_fast.prune(src, _calibration(96), KEEP[family], out=out, batch_size=4, progress=False, return_model=False)
        paths[name] = {"src": src, "pruned": out}
    ids = prompts()
    jobs = [
        engine.Job(paths[n][kind], ids, full_vocab=True, engine=vllm_engine(n))
        for n in CHECKPOINTS for kind in ("src", "pruned")
    ]
    shipped_paths, shipped_ids = _shipped(root)
    jobs += [
        engine.Job(shipped_paths[n][kind], shipped_ids[n], greedy_tokens=GREEDY_TOKENS, engine={"max_model_len": 256})
        for n in SHIPPED for kind in ("src", "pruned")
    ]
    results = iter(engine.run_vllm(jobs))
    served: dict[str, dict] = {}
    for name in CHECKPOINTS:
        served[name] = {}
        for kind in ("src", "pruned"):
            served[name][kind] = {"path": paths[name][kind], "vllm": next(results)}
            if name not in UNSERVED:
                served[name][kind]["hf"] = engine.hf_prompt_logprobs(paths[name][kind], ids, full_vocab=True, dtype=HF_DTYPE.get(name))
    for name in SHIPPED:
        served[name] = {}
        for kind in ("src", "pruned"):
            model = engine.load_hf(shipped_paths[name][kind])
            served[name][kind] = {
                "path": shipped_paths[name][kind], "vllm": next(results),
                "hf": engine.hf_prompt_logprobs(model, shipped_ids[name]),
                "hf_greedy": engine.hf_greedy(model, shipped_ids[name], GREEDY_TOKENS),
            }
    return served


def _typical_gap(a: list, b: list) -> float:
    """TYPICAL_QUANTILE of the per-position max |a - b| over full-vocabulary log-probs of all prompts."""
    per_position = sorted(engine.max_abs_diff(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))
    if len(a) != len(b) or not per_position:
        return float("inf")
    return per_position[min(int(TYPICAL_QUANTILE * len(per_position)), len(per_position) - 1)]


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if n not in UNSERVED])
def test_pruned_export_served_by_vllm_as_transformers_runs_it(served, name) -> None:
    src, pruned = served[name]["src"], served[name]["pruned"]
    with open(os.path.join(pruned["path"], "config.json")) as f:
        config = json.load(f)
    assert "pruning" in config["moe_fast"]
    vllm_src = engine.result(src["vllm"])["prompt_logprobs"]
    vllm_pruned = engine.result(pruned["vllm"])["prompt_logprobs"]
    unpruned_gap = engine.max_abs_diff(vllm_src, src["hf"])
    pruned_gap = engine.max_abs_diff(vllm_pruned, pruned["hf"])
    tolerance = max(2 * unpruned_gap, ROUTING_FLIP_FLOOR.get(name, FLOOR))
    unpruned_typical = _typical_gap(vllm_src, src["hf"])
    pruned_typical = _typical_gap(vllm_pruned, pruned["hf"])
    typical_tolerance = max(2 * unpruned_typical, FLOOR)
    GAPS[name] = {
        "unpruned": unpruned_gap, "pruned": pruned_gap, "tolerance": tolerance,
        "unpruned_typical": unpruned_typical, "pruned_typical": pruned_typical, "typical_tolerance": typical_tolerance,
    }
    limit = KNOWN_LARGE_GAP.get(name, UNPRUNED_LIMIT)
    assert unpruned_gap < limit, f"vLLM serves the unpruned {name} unlike transformers (gap {unpruned_gap:.3g})"
    assert pruned_gap <= tolerance, f"{name}: pruned gap {pruned_gap:.3g} > {tolerance:.3g} (unpruned gap {unpruned_gap:.3g})"
    assert pruned_typical <= typical_tolerance, (
        f"{name}: pruned typical gap {pruned_typical:.3g} > {typical_tolerance:.3g} (unpruned {unpruned_typical:.3g})"
    )
    assert engine.max_abs_diff(src["hf"], pruned["hf"]) > PRUNE_CHANGES_AT_LEAST
    assert engine.max_abs_diff(vllm_src, vllm_pruned) > PRUNE_CHANGES_AT_LEAST


@pytest.mark.parametrize("name", sorted(UNSERVED))
def test_vllm_cpu_refuses_the_export_as_it_refuses_the_source(served, name) -> None:
    for kind in ("src", "pruned"):
        error = served[name][kind]["vllm"].get("error", "")
        assert UNSERVED[name] in error, f"{name} ({kind}): vLLM now serves it ({error or 'no error'}): compare it as the others"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_generates_the_same_greedy_tokens_in_vllm(served, name) -> None:
    src, pruned = served[name]["src"], served[name]["pruned"]
    for kind in ("src", "pruned"):
        got = engine.result(served[name][kind]["vllm"])["greedy"]
        assert got == served[name][kind]["hf_greedy"], f"{name} ({kind}): vLLM's greedy tokens differ from transformers'"
    unpruned_gap = engine.max_abs_diff(engine.result(src["vllm"])["prompt_logprobs"], src["hf"])
    pruned_gap = engine.max_abs_diff(engine.result(pruned["vllm"])["prompt_logprobs"], pruned["hf"])
    tolerance = max(2 * unpruned_gap, FLOOR)
    GAPS[name] = {"unpruned": unpruned_gap, "pruned": pruned_gap, "tolerance": tolerance}
    assert pruned_gap <= tolerance
    assert src["hf_greedy"] != pruned["hf_greedy"] or engine.max_abs_diff(src["hf"], pruned["hf"]) > 2 * tolerance
