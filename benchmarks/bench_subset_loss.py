"""Op 2 (moe_fast.ops.subset_loss) against the reference formulation (moe_fast.reference).

E = 8: all C(8, 4) = 70 candidates that keep 4 experts (rank bound M = 6).
E = 64: one greedy step, the 64 candidates that drop one more expert (M = 3).
Both in layer-wise and progressive mode, 16k tokens, 16 groups, top-2; each for the softmax router
(``ops.subset_loss``) and for a sigmoid router with a selection bias and scaling 2.5, GLM-4.5's kind
(``ops.subset_loss_spec``), each against its reference in the same run.

    python benchmarks/bench_subset_loss.py [--tokens 16384]
"""

from __future__ import annotations

import argparse
import itertools

import torch

import moe_fast  # noqa: F401
from moe_fast import ops, reference
from moe_fast.kernels.routing_spec import RoutingSpec, softmax_routing
from timing import format_table, machine_line, median_seconds


def problem(T: int, E: int, M: int, spec: RoutingSpec, H: int = 64):
    logits = torch.randn(T, E) * 2
    ids = reference.rank_spec(logits, spec)[:, :M].to(torch.int32).contiguous()
    gram, cross, target_sq = ops.expert_gram(torch.randn(T, M, H), torch.randn(T, H))
    all_experts = torch.ones(1, E, dtype=torch.bool)
    tw = reference.subset_weights_spec(ids, logits, all_experts, spec)[0].float()  # unpruned weights
    group = torch.arange(T) * 16 // T
    return logits, ids, gram, cross, target_sq, tw, group


def candidates(E: int, drop: int) -> torch.Tensor:
    sets = list(itertools.combinations(range(E), drop))
    keep = torch.ones(len(sets), E, dtype=torch.bool)
    for c, d in enumerate(sets):
        keep[c, list(d)] = False
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    T, k = args.tokens, 2
    rows = []
    for router in ("softmax", "sigmoid+bias"):
        for name, E, drop in (("E=8, all 70 keep-4 sets", 8, 4), ("E=64, greedy step (64 sets)", 64, 1)):
            spec = softmax_routing(k, True) if router == "softmax" else RoutingSpec(
                scoring="sigmoid", top_k=k, renormalize=True, scaling=2.5, selection_bias=torch.randn(E) * 0.1)
            M = k + drop
            logits, ids, gram, cross, target_sq, tw, group = problem(T, E, M, spec)
            keep = candidates(E, drop)
            for mode, kw in (("layer-wise", dict(target_weights=tw)), ("progressive", dict(cross=cross, target_sq=target_sq))):
                run_op = lambda: ops.subset_loss_spec(gram, ids, logits, keep, group, 16, spec, **kw)  # noqa: E731
                run_ref = lambda: reference.subset_loss_spec(gram, ids, logits, keep, group, 16, spec, **kw)  # noqa: E731
                got, want = run_op(), run_ref()
                rel = float(((got - want).abs().max() / want.abs().max()))
                t_ref = median_seconds(run_ref, repeats=3, warmup=1)
                t_op = median_seconds(run_op, repeats=10, warmup=2)
                rows.append([router, name, mode, keep.shape[0], T, t_ref * 1e3, t_op * 1e3, t_ref / t_op, f"{rel:.1e}"])
    print(f"subset_loss, k=2, 16 groups; {machine_line()}; median milliseconds")
    print(format_table(["router", "case", "mode", "C", "T", "reference ms", "moe_fast ms", "speed-up", "max rel diff"], rows))


if __name__ == "__main__":
    main()
