"""A pruned (or skipping) model against its original on the user's own text, one model loaded at a time.

Why: accuracy on benchmark tasks says little about the user's text; quantization tools judge a
compressed model by the KL divergence of its next-token distribution from the original's and
by how often both pick the same top token (llama.cpp's ``--kl-divergence``). Both models rarely
fit in memory together, so the original runs first and leaves on disk, per token, the
log-probabilities of its ``top`` most likely tokens and the log of the remaining mass (or all
of them with ``top=0``); then it is freed and the model under test is scored against the file.

With ``top > 0`` the KL is that of the two distributions over ``top + 1`` bins (the original's
top tokens and "the rest"): exact when the rest carries no mass, never larger than the full KL
(grouping outcomes cannot increase a divergence).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass

import torch

from moe_fast.evaluation.measures import SkipCounter, data_texts, is_skipping, load_model, tokenize
from moe_fast.serving.patching import patch

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """MODEL against BASE on one text: per-token KL(base || model), top-1 agreement, perplexities."""

    data: str
    tokens: int
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    perplexity_base: float
    perplexity_model: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_model / self.perplexity_base


@dataclass
class ComparisonResult:
    model: str
    base: str
    top: int  # base log-probabilities kept per token (0: all)
    per_data: list[Comparison]
    skip_rate: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for c, row in zip(self.per_data, d["per_data"]):
            row["perplexity_ratio"] = c.perplexity_ratio
        return d

    def table(self) -> str:
        kept = "all log-probabilities" if self.top == 0 else f"top {self.top} log-probabilities + rest"
        head = ("data", "tokens", "KL mean", "KL p99", "top-1 agree", "PPL base", "PPL model", "PPL ratio")
        rows = [head] + [(c.data, str(c.tokens), f"{c.kl_mean:.4f}", f"{c.kl_p99:.4f}", f"{c.top1_agreement:.1%}",
                          f"{c.perplexity_base:.3f}", f"{c.perplexity_model:.3f}", f"{c.perplexity_ratio:.4f}")
                         for c in self.per_data]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"{self.model} against {self.base}: KL(base || model) in nats per token ({kept})"]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        if self.skip_rate is not None:
            lines.append(f"skip rate (2nd+ slots): {self.skip_rate:.1%}")
        return "\n".join(lines)


def _windows(tokenizer, spec: str, max_tokens: int, seq_len: int) -> torch.Tensor:
    ids = tokenize(tokenizer, data_texts(spec), max_tokens)
    n = ids.numel() // seq_len
    if n < 1:
        raise ValueError(f"--data {spec}: {ids.numel()} tokens, fewer than one window of {seq_len} (lower --seq-len)")
    return ids[: n * seq_len].view(n, seq_len)


@torch.inference_mode()
def save_base(model, windows: torch.Tensor, folder: str, top: int, batch_size: int) -> float:
    """Runs the base model; writes one file per batch to ``folder``; returns its total NLL."""
    device = next(model.parameters()).device
    nll = 0.0
    for b, x in enumerate(windows.split(batch_size)):
        logp = torch.log_softmax(model(input_ids=x.to(device), use_cache=False).logits[:, :-1].float(), -1).cpu()
        nll -= float(logp.gather(-1, x[:, 1:].unsqueeze(-1)).sum())
        if top == 0 or top >= logp.shape[-1]:
            entry = {"logp": logp, "argmax": logp.argmax(-1)}
        else:
            values, ids = logp.topk(top, -1)  # sorted: ids[..., 0] is the argmax
            entry = {"values": values, "ids": ids.to(torch.int32), "rest": _log1mexp(torch.logsumexp(values, -1))}
        torch.save(entry, os.path.join(folder, f"batch_{b:06d}.pt"))
    return nll


def _log1mexp(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0; -inf where the mass is (numerically) all there."""
    mass = (-torch.expm1(log_mass.double())).clamp_min(0.0)
    return torch.log(mass).float()


def token_kl(entry: dict, logq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(base || model) per token, whether both top tokens agree) for one batch; ``logq`` [b, L-1, V]."""
    if "logp" in entry:
        logp = entry["logp"]
        kl = (logp.exp() * (logp - logq)).sum(-1)
        return kl, logq.argmax(-1) == entry["argmax"]
    ids = entry["ids"].long()
    values = entry["values"]
    q_top = logq.gather(-1, ids)
    kl = (values.exp() * (values - q_top)).sum(-1)
    rest_p = entry["rest"]
    rest_q = _log1mexp(torch.logsumexp(q_top, -1))
    tail = torch.where(torch.isfinite(rest_p), rest_p.exp() * (rest_p - rest_q), torch.zeros_like(rest_p))
    return kl + tail, logq.argmax(-1) == ids[..., 0]


def _quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile (as numpy's default), for any number of values."""
    v = values.double().sort().values
    pos = q * (v.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


@torch.inference_mode()
def score_against(model, windows: torch.Tensor, folder: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(per-token KL, per-token top-1 agreement, total NLL) of ``model`` against the saved base."""
    device = next(model.parameters()).device
    kls, agree, nll = [], [], 0.0
    for b, x in enumerate(windows.split(batch_size)):
        logq = torch.log_softmax(model(input_ids=x.to(device), use_cache=False).logits[:, :-1].float(), -1).cpu()
        nll -= float(logq.gather(-1, x[:, 1:].unsqueeze(-1)).sum())
        entry = torch.load(os.path.join(folder, f"batch_{b:06d}.pt"))
        kl, same = token_kl(entry, logq)
        kls.append(kl.reshape(-1))
        agree.append(same.reshape(-1))
    return torch.cat(kls), torch.cat(agree), nll


def compare_models(model_spec: str, base_spec: str, data_specs: list[str], *, dtype: torch.dtype = torch.float32,
                   device: str = "cpu", skip: bool = False, beta: float | None = None, max_tokens: int = 16384,
                   seq_len: int = 256, batch_size: int = 8, top: int = 256, work_dir: str | None = None) -> ComparisonResult:
    """``moe-fast eval MODEL --base BASE --data ...``: the base first, saved to disk, then MODEL."""
    with tempfile.TemporaryDirectory(prefix="moe_fast_base_", dir=work_dir) as tmp:
        base, tokenizer, _ = load_model(base_spec, dtype, device)
        vocab = base.config.vocab_size
        windows, base_nll = {}, {}
        for i, spec in enumerate(data_specs):
            windows[spec] = _windows(tokenizer, spec, max_tokens, seq_len)
            os.makedirs(os.path.join(tmp, str(i)))
            base_nll[spec] = save_base(base, windows[spec], os.path.join(tmp, str(i)), top, batch_size)
            log.info("base %s: scored %d tokens of %s", base_spec, windows[spec][:, 1:].numel(), spec)
        del base
        gc.collect()
        model, _, _ = load_model(model_spec, dtype, device, skip=skip and beta is None)
        if beta is not None:
            patch(model, betas=beta)
        if skip and not is_skipping(model):
            raise ValueError(f"--skip: {model_spec} records no skipping betas in its config; give --beta")
        if model.config.vocab_size != vocab:
            raise ValueError(f"--base {base_spec}: its vocabulary has {vocab} tokens, {model_spec}'s "
                             f"{model.config.vocab_size}: not the same tokenizer")
        counter = SkipCounter(model) if skip else None
        rows = []
        try:
            for i, spec in enumerate(data_specs):
                kl, same, nll = score_against(model, windows[spec], os.path.join(tmp, str(i)), batch_size)
                n = kl.numel()
                rows.append(Comparison(spec, n, float(kl.double().mean()), _quantile(kl, 0.99),
                                       float(same.double().mean()), math.exp(base_nll[spec] / n), math.exp(nll / n)))
        finally:
            if counter is not None:
                counter.remove()
    return ComparisonResult(model_spec, base_spec, top, rows, counter.rate if counter is not None else None)
