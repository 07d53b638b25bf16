"""Multiple-choice accuracy without lm-eval's overhead, scored as lm-eval scores it.

Why: the demo scores dozens of selections; lm-eval runs the context once per choice and its
per-request machinery costs more than the small model. The rule is lm-eval's
(``HFLM._encode_pair``): the context's trailing whitespace moves into the continuation; the
model reads ``tokenize(context.rstrip())`` followed by the tokens of ``tokenize(context +
choice)`` past that length; a choice's score is the sum of those continuation tokens'
log-probs; ``acc`` takes the best score, ``acc_norm`` the best score per character of the
choice, and the standard error is the sample one, as lm-eval reports it.

Speed: an item is packed into one sequence, its context once and then its choices side by
side, with a 4-D attention mask in which each choice sees the context and itself only and
position ids that restart after the context for each choice: the same logits as four separate
sequences, for about a third of the tokens. Packed items are right-padded into batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_fast.evaluation.tasks.items import Item


@dataclass(frozen=True)
class Packed:
    """One item as one sequence: context tokens, then each choice's continuation tokens."""

    context: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.context) + sum(len(c) for c in self.choices)


def encode(tokenizer, items: list[Item]) -> list[Packed]:
    """Every item tokenized as lm-eval's causal backend does (``HFLM._encode_pair``)."""
    out = []
    for item in items:
        context = tuple(tokenizer(item.context.rstrip())["input_ids"])
        choices = []
        for choice in item.choices:
            whole = tokenizer(item.context + choice)["input_ids"]
            choices.append(tuple(whole[len(context):]))
        out.append(Packed(context, tuple(choices)))
    return out


def _layout(packed: Packed, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids [L], position ids [L], allowed [L, L]) of one packed item, right-padded to ``length``."""
    n = len(packed.context)
    ids = list(packed.context)
    pos = list(range(n))
    allowed = torch.zeros(length, length, dtype=torch.bool)
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    at = n
    for cont in packed.choices:
        m = len(cont)
        ids += cont
        pos += range(n, n + m)
        allowed[at : at + m, :n] = True
        allowed[at : at + m, at : at + m] = torch.ones(m, m, dtype=torch.bool).tril()
        at += m
    pad = length - at
    idx = torch.arange(at, length)
    allowed[idx, idx] = True  # padding sees itself only (a row with no allowed key would give NaN)
    return (torch.tensor(ids + [0] * pad), torch.tensor(pos + [0] * pad), allowed)


@torch.inference_mode()
def choice_loglikelihoods(model, packed: list[Packed], batch_tokens: int = 4096) -> torch.Tensor:
    """[items, choices] float64: each choice's summed log-probability after its context."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    num_choices = max(len(p.choices) for p in packed)
    out = torch.full((len(packed), num_choices), float("nan"), dtype=torch.float64)
    order = sorted(range(len(packed)), key=lambda k: len(packed[k]))
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(packed[order[end]]) <= batch_tokens:
            end += 1
        rows = [packed[k] for k in order[start:end]]
        length = max(len(p) for p in rows)
        ids, pos, allowed = (torch.stack(t) for t in zip(*(_layout(p, length) for p in rows)))
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        logits = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                       use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1).cpu()
        for r, (k, p) in enumerate(zip(order[start:end], rows)):
            n = len(p.context)
            at = n
            for j, cont in enumerate(p.choices):
                # the first continuation token is predicted by the context's last token, the others by their predecessor
                sources = [n - 1] + list(range(at, at + len(cont) - 1))
                out[k, j] = float(logp[r, sources, list(cont)].double().sum())
                at += len(cont)
        start = end
    return out


def _stderr(hits: list[float]) -> float:
    n = len(hits)
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n) if n > 1 else 0.0


def accuracy(items: list[Item], lls: torch.Tensor) -> dict[str, float]:
    """{acc, acc_stderr, acc_norm, acc_norm_stderr, n} as lm-eval computes them (ties: the first choice)."""
    hits, hits_norm = [], []
    for i, item in enumerate(items):
        scores = lls[i].tolist()
        norm = [s / len(c) for s, c in zip(scores, item.choices)]
        hits.append(float(max(range(len(scores)), key=lambda j: (scores[j], -j)) == item.gold))
        hits_norm.append(float(max(range(len(norm)), key=lambda j: (norm[j], -j)) == item.gold))
    return {"acc": sum(hits) / len(hits), "acc_stderr": _stderr(hits),
            "acc_norm": sum(hits_norm) / len(hits_norm), "acc_norm_stderr": _stderr(hits_norm), "n": len(items)}


def subset(items: tuple[Item, ...], count: int) -> list[Item]:
    """``count`` items spread evenly over the task (every k-th), so that every module is represented."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]
