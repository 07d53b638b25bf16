"""vLLM serving a skipping checkpoint, with the plugin's counters: what tests/serving/vllm/test_skipping_families.py compares.

Like engine.py (whose environment and engine settings it reuses), vLLM runs in a child process
(this file as a script) that writes JSON; the engine runs in that process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ``moe_fast.serving.vllm_plugin.stats`` there counts what the
engine's MoE layers did. engine.py's child does not return those counters, hence this helper.

``serve_skipping(jobs)``: a job is ``{"skip": DIR, "source": DIR, "prompts": [[ids]], "engine": {...}}``
(``engine``: ``vllm.LLM`` keyword arguments over engine.py's ``ENGINE_DEFAULTS``); its result
has ``"batched"`` (the skip checkpoint's prompt log-probs, all prompts in one ``generate``),
``"alone"`` (each prompt in its own ``generate``), ``"counts"`` (the plugin's per-layer counters for
the batched run) and ``"source"`` (the source checkpoint's batched prompt log-probs) and
``"source_counts"`` (the counters while serving it: none, the plugin stays idle).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from engine import CHILD_ENV, ENGINE_DEFAULTS, TIMEOUT_S, VllmChildError, _shutdown, run_job_file


def serve_skipping(jobs: list[dict]) -> list[dict]:
    """Runs every job in one child process; one result per job (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="moe_fast_vllm_skip_") as tmp:
        spec, out = os.path.join(tmp, "jobs.json"), os.path.join(tmp, "results.json")
        with open(spec, "w") as f:
            json.dump(jobs, f)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), spec, out], env=os.environ | CHILD_ENV, cwd=tmp,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S,
        )
        if proc.returncode != 0 or not os.path.exists(out):
            raise VllmChildError(f"vLLM child process exited with {proc.returncode}:\n{proc.stdout[-6000:]}")
        with open(out) as f:
            return json.load(f)


def _logprobs(llm, prompts: list[list[int]]) -> list[list[float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    return [[row[t].logprob for row, t in zip(o.prompt_logprobs[1:], p[1:])] for o, p in zip(outputs, prompts)]


def _serve(job: dict) -> dict:
    from vllm import LLM

    from moe_fast.serving.vllm_plugin import stats

    answer: dict = {}
    llm = LLM(model=job["skip"], **(ENGINE_DEFAULTS | job.get("engine", {})))
    stats.reset()  # forget the engine's warm-up run
    answer["batched"] = _logprobs(llm, job["prompts"])
    answer["counts"] = stats.snapshot()
    answer["alone"] = [_logprobs(llm, [p])[0] for p in job["prompts"]]
    _shutdown(llm)
    llm = LLM(model=job["source"], **(ENGINE_DEFAULTS | job.get("engine", {})))
    stats.reset()
    answer["source"] = _logprobs(llm, job["prompts"])
    answer["source_counts"] = stats.snapshot()
    _shutdown(llm)
    return answer


if __name__ == "__main__":
    run_job_file(sys.argv[1], sys.argv[2], _serve)
