"""An independent multiple-choice scorer: one plain forward per (context, choice), lm-eval's split rule."""

from __future__ import annotations

import torch


@torch.no_grad()
def choice_loglikelihood(model, tokenizer, context: str, choice: str) -> float:
    """Sum of the choice's token log-probs after the context, as lm-eval's HFLM._encode_pair splits them:
    the context's trailing whitespace moves into the continuation; the model reads tokenize(context
    without it) followed by the tokens of tokenize(context + choice) past that length."""
    ctx = tokenizer(context.rstrip())["input_ids"]
    cont = tokenizer(context + choice)["input_ids"][len(ctx):]
    seq = ctx + cont
    logp = torch.log_softmax(model(input_ids=torch.tensor([seq[:-1]])).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def accuracy(model, tokenizer, items) -> tuple[list[list[float]], float, float]:
    """(per-item choice log-likelihoods, acc, acc_norm): argmax of the sums, and of the sums per character."""
    lls, acc, acc_norm = [], 0, 0
    for item in items:
        ll = [choice_loglikelihood(model, tokenizer, item.context, c) for c in item.choices]
        lls.append(ll)
        k = len(ll)
        acc += max(range(k), key=lambda j: (ll[j], -j)) == item.gold
        acc_norm += max(range(k), key=lambda j: (ll[j] / len(item.choices[j]), -j)) == item.gold
    return lls, acc / len(items), acc_norm / len(items)
