"""vLLM and transformers side by side on one checkpoint: teacher-forced prompt log-probs and greedy tokens.

vLLM's engine starts worker processes, so it runs here in a child Python process (this file run
as a script, behind its ``__main__`` guard) that writes its results as JSON: tests stay importable,
one crashed engine fails one test, and several checkpoints share one process start and one import
of vLLM.

Interface (every token sequence is a list of ints; nothing needs a tokenizer):

* ``run_vllm(jobs) -> list[dict]``: one child process serves the checkpoints of ``jobs`` one after
  another. A job is ``Job(model, prompts, greedy_tokens=0, full_vocab=False, engine={})``; its
  result is a dict with
  ``"prompt_logprobs"``: per prompt, ``log p(prompt[i] | prompt[:i])`` for ``i >= 1`` (a list of
  ``len(prompt) - 1`` floats; with ``full_vocab`` the whole log-distribution at each position, a
  list of ``len(prompt) - 1`` lists of ``vocab_size`` floats, position ``i`` predicting token
  ``i + 1``), ``"greedy"``: per prompt, the ``greedy_tokens`` new token ids (temperature 0, EOS
  ignored; absent when ``greedy_tokens == 0``), and ``"seconds"``: engine start and run times.
  ``engine`` adds or overrides ``vllm.LLM`` keyword arguments (``ENGINE_DEFAULTS``: float32, eager,
  no tokenizer, short sequences). A job whose engine fails gets ``{"error": "..."}`` instead, and
  the next job still runs; ``result(r)`` returns a result or raises ``VllmChildError`` with its error.
* ``vllm_prompt_logprobs(model, prompts, full_vocab=False, **engine)`` and
  ``vllm_greedy(model, prompts, n, **engine)``: one job each.
* ``hf_prompt_logprobs(model, prompts, full_vocab=False, dtype=torch.float32)`` and
  ``hf_greedy(model, prompts, n)``: the same from transformers, in this process (``model`` a
  directory or a loaded model; an MXFP4 checkpoint is loaded dequantized).
* ``max_abs_diff(a, b)``: the largest absolute difference between two such nested lists.

The child's output goes to the file ``MOE_FAST_VLLM_LOG`` names (appended; to follow a long run),
else to a temporary file whose end an error shows. vLLM's child process inherits the environment; ``CHILD_ENV`` sets what a small CPU machine needs
(a 1 GiB KV cache instead of a fraction of all memory, no thread pinning, no usage reporting).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Any, Sequence

ENGINE_DEFAULTS: dict[str, Any] = dict(
    dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=128, max_num_seqs=8,
    seed=0, enable_prefix_caching=False, max_logprobs=-1,
)
CHILD_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
TIMEOUT_S = 900


@dataclasses.dataclass
class Job:
    """One checkpoint served by ``vllm.LLM``: what to compute on it (see the module docstring)."""

    model: str
    prompts: list[list[int]]
    greedy_tokens: int = 0
    full_vocab: bool = False
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)


class VllmChildError(RuntimeError):
    """The child process failed: its exit status and the end of its output."""


def run_vllm(jobs: Sequence[Job], timeout: float = TIMEOUT_S) -> list[dict]:
    """Serves each job's checkpoint with ``vllm.LLM`` in one child process; one result dict per job."""
    with tempfile.TemporaryDirectory(prefix="moe_fast_vllm_") as tmp:
        spec, out = os.path.join(tmp, "jobs.json"), os.path.join(tmp, "results.json")
        with open(spec, "w") as f:
            json.dump([dataclasses.asdict(job) for job in jobs], f)
        env = os.environ | CHILD_ENV
        log_path = os.environ.get("MOE_FAST_VLLM_LOG") or os.path.join(tmp, "child.log")
        with open(log_path, "a") as log:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), spec, out], env=env, cwd=tmp,
                stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
            )
        if proc.returncode != 0 or not os.path.exists(out):
            with open(log_path) as log:
                tail = log.read()[-6000:]
            raise VllmChildError(f"vLLM child process exited with {proc.returncode}:\n{tail}")
        with open(out) as f:
            return json.load(f)


def result(r: dict) -> dict:
    """A job's result, or ``VllmChildError`` with the error the child recorded for it."""
    if "error" in r:
        raise VllmChildError(r["error"])
    return r


def vllm_prompt_logprobs(model: str, prompts: list[list[int]], full_vocab: bool = False, **engine) -> list:
    """Teacher-forced log-probs of each prompt's tokens from vLLM (see the module docstring)."""
    return result(run_vllm([Job(str(model), prompts, full_vocab=full_vocab, engine=engine)])[0])["prompt_logprobs"]


def vllm_greedy(model: str, prompts: list[list[int]], n: int, **engine) -> list[list[int]]:
    """``n`` greedily generated token ids per prompt from vLLM."""
    return result(run_vllm([Job(str(model), prompts, greedy_tokens=n, engine=engine)])[0])["greedy"]


def load_hf(model, dtype=None):
    """A directory loaded with transformers in ``dtype`` (default float32; MXFP4 dequantized), or ``model`` itself."""
    import torch

    if not isinstance(model, (str, os.PathLike)):
        return model
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype}
    with open(os.path.join(model, "config.json")) as f:
        quant = json.load(f).get("quantization_config") or {}
    if quant.get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(model), **kwargs).eval()
    for p in loaded.parameters():  # before transformers 5.24 dequantized experts stay bf16
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return loaded


def hf_prompt_logprobs(model, prompts: list[list[int]], full_vocab: bool = False, dtype=None) -> list:
    """Teacher-forced log-probs from transformers, in the layout of :func:`vllm_prompt_logprobs`."""
    import torch

    hf = load_hf(model, dtype)
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logp = hf(ids).logits[0, :-1].float().log_softmax(-1)
            if full_vocab:
                results.append(logp.tolist())
            else:
                results.append(logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    return results


def hf_greedy(model, prompts: list[list[int]], n: int, dtype=None) -> list[list[int]]:
    """``n`` greedy tokens per prompt from transformers (argmax of the full forward; EOS does not stop it)."""
    import torch

    hf = load_hf(model, dtype)
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(n):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
            results.append(ids[len(prompt):])
    return results


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over two equally shaped nested lists of floats (inf when shapes differ or a value is not finite)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        d = abs(float(a) - float(b))
        return d if math.isfinite(d) else math.inf
    if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)) or len(a) != len(b):
        return math.inf
    return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)


# ----------------------------------------------------------------------------------------------
# The child process: python engine.py JOBS.json RESULTS.json


def _serve(job: dict) -> dict:
    """One engine: start it on the job's checkpoint, compute what the job asks, shut it down."""
    import time

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], **(ENGINE_DEFAULTS | job["engine"]))
    t1 = time.perf_counter()
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in job["prompts"]]
    answer: dict[str, Any] = {}
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=-1 if job["full_vocab"] else 0, detokenize=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    logprobs = []
    for prompt, output in zip(job["prompts"], outputs):
        rows = output.prompt_logprobs[1:]  # position 0 has no prediction
        if job["full_vocab"]:
            vocab = max(len(row) for row in rows)
            logprobs.append([[row[t].logprob for t in range(vocab)] for row in rows])
        else:
            logprobs.append([row[t].logprob for row, t in zip(rows, prompt[1:])])
    answer["prompt_logprobs"] = logprobs
    if job["greedy_tokens"]:
        params = SamplingParams(temperature=0.0, max_tokens=job["greedy_tokens"], ignore_eos=True, detokenize=False)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        answer["greedy"] = [list(o.outputs[0].token_ids) for o in outputs]
    t2 = time.perf_counter()
    answer["seconds"] = {"start": t1 - t0, "run": t2 - t1}
    _shutdown(llm)
    return answer


def _shutdown(llm) -> None:
    """Stops the engine's worker processes and frees its distributed state, so that the next job can start one."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()
    del llm
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
    except ImportError:
        pass


def run_job_file(spec: str, out: str, serve=None) -> None:
    """The child's loop (also skip_engine.py's): each job of the JSON file ``spec`` through ``serve``
    (default: this module's), results to ``out``."""
    import traceback

    serve = serve or _serve

    with open(spec) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:  # one failed engine is reported in its result, and the next job still runs
        label = next((job[key] for key in ("model", "skip", "source") if key in job), "?")
        print(f"moe_fast vllm job: {label}", flush=True)
        try:
            results.append(serve(job))
        except Exception as err:
            traceback.print_exc()
            results.append({"error": f"{type(err).__name__}: {err}"[:4000]})
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    run_job_file(sys.argv[1], sys.argv[2])
