"""How many expert outputs per token an exact exhaustive search must compute, by certificate kind.

The lazy exhaustive search (``moe_fast/pruning/lazy_search.py``) proves its argmin by branch and
bound: a candidate's error over the tokens whose outputs it needs are computed is a lower bound of
its full error (an uncovered token adds >= 0). This study replays such searches on exact losses
(every expert output is computed here up front, only to read the losses) and counts the outputs
each search would have had to compute, per token, for:

* ``prefix``: today's lazy search: a token holds its first d ranks (starting at k + 1), and a
  candidate covers it when its top-k among the kept lies within them;
* ``sparse``: a token holds any set of experts (starting at its top-k, which the target needs), and
  a candidate covers it when it holds the candidate's own top-k among the kept: no rank between is
  computed;
* ``sparse-partial``: as ``sparse``, but once a best exact score exists, a candidate is extended on
  a tenth of its uncovered tokens at a time (those where it drops the most routing weight first),
  so that it is discarded as soon as its bound passes the best.

and the floors: what scoring the winner alone costs under each kind (no certificate can cost less).
Also the rank bound k + E - R that the rank-bounded search computes.

    python benchmarks/bench_exhaustive_bounds.py                  # shipped small Mixtral + a random block
    python benchmarks/bench_exhaustive_bounds.py --source random  # the random Mixtral-shaped block only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch

from moe_fast.reference import rank_experts


def candidate_weights(logits: torch.Tensor, probs: torch.Tensor, keep: torch.Tensor, k: int) -> torch.Tensor:
    """[C, T, E] float64: each keep-set's renormalized top-k weights among its kept experts."""
    C, (T, E) = keep.shape[0], logits.shape
    masked = logits.unsqueeze(0).masked_fill(~keep.unsqueeze(1), -math.inf)  # [C, T, E]
    top = torch.topk(masked, k, dim=-1).indices  # ties: transformers' topk as well
    p = probs.unsqueeze(0).expand(C, T, E).gather(-1, top)
    return torch.zeros(C, T, E, dtype=torch.float64).scatter_(-1, top, p / p.sum(-1, keepdim=True))


def study_layer(x_outputs: torch.Tensor, logits: torch.Tensor, group: torch.Tensor, num_groups: int, k: int, keep_r: int) -> dict:
    """Replays the three searches on one layer's outputs [T, E, H] and router logits [T, E]."""
    T, E, _ = x_outputs.shape
    probs = torch.softmax(logits.double(), -1)
    cands = list(itertools.combinations(range(E), E - keep_r))
    keep = torch.ones(len(cands), E, dtype=torch.bool)
    for i, d in enumerate(cands):
        keep[i, list(d)] = False
    W = candidate_weights(logits, probs, keep, k)
    w0 = candidate_weights(logits, probs, torch.ones(1, E, dtype=torch.bool), k)[0]
    gram = torch.einsum("teh,tfh->tef", x_outputs, x_outputs)
    D = W - w0.unsqueeze(0)
    err = torch.einsum("cte,tef,ctf->ct", D, gram, D).clamp_min(0.0)  # [C, T] squared errors

    order, _ = rank_experts(logits)
    rank_of = torch.empty_like(order).scatter_(1, order, torch.arange(E).expand(T, E))  # [T, E] rank of each expert
    sparse_need = (W > 0) | (w0 > 0).unsqueeze(0)  # [C, T, E]
    depth = torch.where(W > 0, rank_of.unsqueeze(0) + 1, torch.zeros_like(rank_of).unsqueeze(0)).amax(-1)  # [C, T]
    prefix_need = rank_of.unsqueeze(0) < depth.clamp_min(k + 1).unsqueeze(-1)  # [C, T, E]

    def objective(e: torch.Tensor) -> torch.Tensor:
        return torch.zeros(e.shape[0], num_groups, dtype=torch.float64).index_add_(1, group, e).sqrt().sum(1)

    true_best = int(torch.argmin(objective(err)))
    row = {"R": keep_r, "rank_bound": k + E - keep_r, "candidates": len(cands),
           "floor_prefix": float(prefix_need[true_best].sum(-1).double().mean()),
           "floor_sparse": float(sparse_need[true_best].sum(-1).double().mean())}
    for kind, need, start in (("prefix", prefix_need, rank_of < k + 1), ("sparse", sparse_need, w0 > 0),
                              ("sparse-partial", sparse_need, w0 > 0)):
        held, best, rounds = branch_and_bound(err, need, start.clone(), objective, w0, keep, partial=kind.endswith("partial"))
        row[kind] = float(held.sum(-1).double().mean())
        row[f"{kind}_rounds"] = rounds
        assert best == true_best, f"{kind}: the search picked {cands[best]}, the argmin is {cands[true_best]}"
    return row


def branch_and_bound(err, need, held, objective, w0, keep, partial: bool) -> tuple[torch.Tensor, int, int]:
    """(outputs held [T, E] at the end, the argmin, rounds) of one branch-and-bound search."""
    C, T = err.shape
    alive = torch.ones(C, dtype=torch.bool)
    exact: dict[int, float] = {}
    rounds = 0
    while True:
        rounds += 1
        covered = (~need | held.unsqueeze(0)).all(-1)  # [C, T]
        bound = objective(torch.where(covered, err, torch.zeros_like(err)))
        full = covered.all(1)
        for i in torch.nonzero(full & alive).squeeze(1).tolist():
            exact.setdefault(i, float(bound[i]))
        best = min(exact, key=lambda i: (exact[i], i)) if exact else None
        open_ = alive & ~full
        if best is not None:
            cut = open_ & (bound > exact[best] * (1 + 1e-9))
            alive &= ~cut
            open_ &= ~cut
        if not bool(open_.any()):
            return held, best, rounds
        share = covered.sum(1).clamp_min(1).double() / T
        pick = int(torch.argmin(torch.where(open_, bound / share.sqrt(), torch.full_like(bound, math.inf))))
        tokens = ~covered[pick]
        if partial and best is not None:  # a tenth of its uncovered tokens, most dropped weight first
            dropped_weight = (w0 * (~keep[pick]).double()).sum(-1).masked_fill(~tokens, -1.0)
            n = max(1, int(tokens.sum()) // 10)
            tokens = torch.zeros_like(tokens).index_fill_(0, torch.argsort(-dropped_weight, stable=True)[:n], True)
        held[tokens] |= need[pick][tokens]


def shipped_layers(n_samples: int, seq_len: int, batch: int) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, outputs [T, E, H] float64, logits [T, E], group [T]) of every layer of the shipped
    small Mixtral on the built-in prose calibration text (python-prose)."""
    from transformers import AutoModelForCausalLM

    from moe_fast.adapters import get_adapter
    from moe_fast.data.calibration import load_calibration
    from moe_fast.checkpoint.loading import load_tokenizer
    from moe_fast.models import resolve_model

    path = resolve_model("builtin:small-mixtral")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = load_calibration("builtin:python-prose", load_tokenizer(path), n_samples, seq_len, seed=0)
    adapter = get_adapter(model)
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [ref.block.register_forward_pre_hook(lambda m, a, _l=ref.layer: inputs.setdefault(_l, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for ref in adapter.moe_blocks(model)]
    with torch.no_grad():
        for lo in range(0, ids.shape[0], batch):
            model(ids[lo : lo + batch])
    for h in hooks:
        h.remove()
    group = torch.arange(ids.numel()) // (batch * seq_len)
    out = []
    with torch.no_grad():
        for ref in adapter.moe_blocks(model):
            x = torch.cat(inputs[ref.layer])
            logits = torch.nn.functional.linear(x, ref.router.weight).float()
            y = torch.stack([adapter.expert_forward(ref.experts, e, x) for e in range(adapter.num_experts)], 1).double()
            out.append((f"small-mixtral layer {ref.layer}", y, logits, group))
    return out


def random_layer(tokens: int, hidden: int, ffn: int, experts: int, batch_tokens: int, seed: int = 0):
    """A Mixtral-shaped block with random SwiGLU experts and router (logit std about 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    logits = x @ (torch.randn(experts, hidden, generator=g) / hidden**0.5).T
    ys = []
    for _ in range(experts):
        wg, wu = (torch.randn(ffn, hidden, generator=g) / hidden**0.5 for _ in range(2))
        wd = torch.randn(hidden, ffn, generator=g) / ffn**0.5
        ys.append((torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T)
    return (f"random block, hidden {hidden}", torch.stack(ys, 1).double(), logits, torch.arange(tokens) // batch_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=["all", "shipped", "random"], default="all")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per calibration batch (a group of the objective)")
    p.add_argument("--keep", type=int, nargs="+", default=[6, 4])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    layers = []
    if args.source in ("all", "shipped"):
        layers += shipped_layers(args.n_samples, args.seq_len, args.batch_size)
    if args.source in ("all", "random"):
        layers.append(random_layer(args.n_samples * args.seq_len, 256, 512, 8, args.batch_size * args.seq_len))
    rows = []
    for name, y, logits, group in layers:
        for r in args.keep:
            rows.append({"layer": name, **study_layer(y, logits, group, int(group.max()) + 1, 2, r)})
    print("| layer | R | rank bound | prefix B&B | sparse B&B | sparse, partial extension | winner alone: prefix / sparse |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['R']} | {r['rank_bound']} | {r['prefix']:.2f} | {r['sparse']:.2f} | {r['sparse-partial']:.2f} | "
              f"{r['floor_prefix']:.2f} / {r['floor_sparse']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
