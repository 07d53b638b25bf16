"""Evaluating a (pruned, skipping) MoE model: the numbers the paper's table needs.

Perplexity on held-out text (non-overlapping windows, each scored on its own), tokens/s of
greedy generation, peak memory, parameter count, size on disk, and the measured skip rate when
skipping is on. Why a module of its own: ``moe-fast eval`` and ``moe-fast demo`` must measure
every variant the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from moe_fast.adapters import get_adapter
from moe_fast.data.calibration import read_texts
from moe_fast.data.builtin import load_builtin, parse_builtin_spec
from moe_fast.checkpoint.loading import load_pretrained
from moe_fast.host.ram import process_max_rss_bytes, reset_peak_rss, vm_hwm_bytes
from moe_fast.checkpoint.preflight import check_model_dir
from moe_fast.models import quiet_loading, resolve_model
from moe_fast.serving.patching import current_betas, patch_handle
from moe_fast.serving.saving import from_pretrained

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# --------------------------------------------------------------------------------------- data
def data_texts(spec: str) -> str:
    """Held-out text for a data spec.

    ``builtin:NAME`` is the test split of a built-in corpus (``builtin:NAME:SPLIT`` picks another);
    a ``.txt`` file is used whole; ``.json``/``.jsonl`` records' ``text`` fields are joined.
    """
    if spec.startswith("builtin:"):
        _, split = parse_builtin_spec(spec)
        return load_builtin(spec, split=split or "test")
    if not os.path.exists(spec):
        raise FileNotFoundError(f"evaluation data {spec!r} does not exist (give builtin:NAME or a .txt/.jsonl file)")
    return "\n\n".join(read_texts(spec))


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens), at most ``max_tokens`` of them.

    Long texts are cut at line ends into pieces of about 64k characters and stop as soon as
    enough tokens are collected, so a huge file costs only what is evaluated.
    """
    ids: list[int] = []
    start = 0
    while start < len(text) and (max_tokens is None or len(ids) < max_tokens):
        end = text.find("\n", start + 65536)
        end = len(text) if end < 0 else end + 1
        ids.extend(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------- measures
@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of ``seq_len`` tokens; returns (ppl, tokens scored).

    Each window is scored on its own (its first token has no context and is not predicted), so
    the result does not depend on ``batch_size``.
    """
    n = (ids.numel()) // seq_len
    if n < 1:
        raise ValueError(f"perplexity: {ids.numel()} tokens are fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    windows = ids[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        x = batch.to(device)
        logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count), count


@torch.no_grad()
def generation_speed(model: nn.Module, prompts: list[torch.Tensor], new_tokens: int = 32) -> float:
    """Tokens/s of greedy generation (batch 1): the best run over ``prompts``, after a warm-up run.

    The best run, not the mean: on a shared machine other work only ever slows a run down, so
    the fastest one is the closest to the model's own speed.
    """
    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", None) or getattr(model.config, "eos_token_id", None)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    rates = []
    for i, prompt in enumerate([prompts[0]] + list(prompts)):
        x = prompt.view(1, -1).to(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        if i > 0:  # the first run warms caches up
            rates.append((out.shape[1] - x.shape[1]) / took)
    return max(rates)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the (unique) parameters, in ``dtype`` when given (what a save in that dtype writes)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None else p.element_size()
        total += p.numel() * size
    return total


def size_on_disk(path: str) -> int:
    """Bytes of the weight files in a checkpoint directory (tokenizer and config not counted)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES)
    )


class PeakMemory:
    """Peak memory of a block of code: CUDA allocator peak, or the process's peak RSS on CPU.

    On Linux the RSS high-water mark is reset on entry (``/proc/self/clear_refs``) so the peak
    belongs to this block; elsewhere it is the process's lifetime peak (``peak_is_process``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_peak"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if not reset_peak_rss():
                self.kind = "rss_peak_process"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        hwm = vm_hwm_bytes()
        if hwm is not None:
            self.peak_bytes = hwm
            return
        self.peak_bytes = process_max_rss_bytes()
        self.kind = "rss_peak_process"


class SkipCounter:
    """Counts skipped routing slots seen by the experts modules (index E, or weight 0, in slots >= 1).

    It hooks the experts call, so it measures what actually ran, whoever did the routing: the
    blocks ``moe_fast.patch`` patched (its handle) on a patched model, the adapter's blocks otherwise.
    """

    def __init__(self, model: nn.Module) -> None:
        self.handles = []
        self.skipped = 0
        self.slots = 0
        patched = patch_handle(model)
        for ref in patched.blocks if patched is not None else get_adapter(model).moe_blocks(model):
            self.handles.append(ref.experts.register_forward_pre_hook(self._hook, with_kwargs=True))

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        values = list(args) + [kwargs.get(k) for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
        if len(values) < 3:
            return
        index, weights = values[1], values[2]
        if index.dim() != 2 or index.shape[1] < 2:
            return
        num_experts = module.gate_up_proj.shape[0] if hasattr(module, "gate_up_proj") else getattr(module, "num_experts", -1)
        later = index[:, 1:]
        skipped = (later >= num_experts) | (weights[:, 1:] == 0)
        self.skipped += int(skipped.sum())
        self.slots += later.numel()

    @property
    def rate(self) -> float:
        """Fraction of the second (and later) routing slots that were skipped."""
        return self.skipped / self.slots if self.slots else 0.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# -------------------------------------------------------------------------------------- eval
@dataclass
class EvalResult:
    """Everything ``moe-fast eval`` reports for one model."""

    model: str
    num_experts: int
    top_k: int
    parameters: int
    size_on_disk_bytes: int
    size_is_estimate: bool
    perplexity: dict[str, float]
    tokens_scored: dict[str, int]
    tokens_per_s: float | None
    peak_memory_bytes: int
    peak_memory_kind: str
    skip_rate: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [("model", self.model), ("experts kept / top-k", f"{self.num_experts} / {self.top_k}")]
        for name, ppl in self.perplexity.items():
            rows.append((f"perplexity {name}", f"{ppl:.3f}  ({self.tokens_scored[name]} tokens)"))
        if self.tokens_per_s is not None:
            rows.append(("greedy tokens/s", f"{self.tokens_per_s:.1f}"))
        if self.skip_rate is not None:
            rows.append(("skip rate (2nd+ slots)", f"{self.skip_rate:.1%}"))
        rows.append(("parameters", f"{self.parameters / 1e6:.2f}M"))
        est = " (estimate: not saved)" if self.size_is_estimate else ""
        rows.append(("size on disk", f"{self.size_on_disk_bytes / 2**20:.2f} MiB{est}"))
        rows.append((f"peak memory ({self.peak_memory_kind})", f"{self.peak_memory_bytes / 2**20:.0f} MiB"))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def evaluate(
    model: nn.Module,
    tokenizer,
    data: dict[str, str],
    *,
    name: str = "model",
    path: str | None = None,
    max_tokens: int = 16384,
    seq_len: int = 256,
    batch_size: int = 8,
    gen_prompts: int = 3,
    gen_prompt_len: int = 32,
    new_tokens: int = 32,
    save_dtype: torch.dtype | None = torch.float16,
    measure_skips: bool | None = None,
) -> EvalResult:
    """Evaluates a loaded model on held-out texts ``{label: text}``.

    Args:
        path: the model's checkpoint directory, for its size on disk; without it the size is
            the parameters' bytes in ``save_dtype`` (``size_is_estimate``).
        max_tokens: tokens of each text scored (the first ones), in windows of ``seq_len``.
        gen_prompts, new_tokens: greedy generation of ``new_tokens`` from ``gen_prompts`` prompts of
            ``gen_prompt_len`` tokens taken from the first text (tokens/s of the best run); 0 prompts
            skips the speed test.
        measure_skips: count skipped slots (default: when the model is patched for skipping).
    """
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    model.eval()
    if measure_skips is None:
        measure_skips = is_skipping(model)
    ids = {label: tokenize(tokenizer, text, max_tokens) for label, text in data.items()}
    ppl, scored = {}, {}
    counter = SkipCounter(model) if measure_skips else None
    with PeakMemory(device) as peak:
        try:
            for label, x in ids.items():
                ppl[label], scored[label] = perplexity(model, x, seq_len, batch_size)
                log.info("%s: perplexity on %s = %.3f", name, label, ppl[label])
        finally:
            if counter is not None:
                counter.remove()
        speed = None
        if gen_prompts > 0:
            first = next(iter(ids.values()))
            step = max(gen_prompt_len, (first.numel() - gen_prompt_len) // max(1, gen_prompts))
            prompts = [first[i * step : i * step + gen_prompt_len] for i in range(gen_prompts)]
            prompts = [p for p in prompts if p.numel() == gen_prompt_len] or [first[:gen_prompt_len]]
            speed = generation_speed(model, prompts, new_tokens)
    if path is not None and os.path.exists(path):
        size, estimate = size_on_disk(path), False
    else:
        size, estimate = weights_bytes(model, save_dtype), True
    return EvalResult(
        model=name,
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        parameters=parameter_count(model),
        size_on_disk_bytes=size,
        size_is_estimate=estimate,
        perplexity=ppl,
        tokens_scored=scored,
        tokens_per_s=speed,
        peak_memory_bytes=peak.peak_bytes,
        peak_memory_kind=peak.kind,
        skip_rate=counter.rate if counter is not None else None,
        seconds=time.perf_counter() - t0,
    )


def is_skipping(model: nn.Module) -> bool:
    """Whether the model is patched with skipping thresholds on any layer."""
    return any(b is not None for b in current_betas(model).values())


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu", skip: bool = False):
    """(model, tokenizer, path) for a built-in model (``builtin:NAME``), a directory or a hub id.

    With ``skip`` the model is loaded through ``moe_fast.from_pretrained`` (patched with the betas
    recorded in its config); without, as a stock transformers model.
    """
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    if os.path.isdir(path):
        check_model_dir(path)  # a truncated or corrupt file, a bad MXFP4 pair: one clear error instead of a traceback
    with quiet_loading():
        if skip:
            model = from_pretrained(path, dtype=dtype)
        else:
            model = load_pretrained(path, dtype=dtype)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, path


def write_json(obj: Any, path: str) -> None:
    """JSON written to a temporary file and moved in whole."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
