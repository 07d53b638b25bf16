"""Op 1 (moe_fast.ops.route) against transformers' Mixtral routing + one_hot/where dispatch.

Both start from router logits (the gate matmul is the same for both and left out). The
transformers baseline is MixtralTopKRouter's softmax/top-k/renormalize followed by the
one_hot/permute/nonzero/where dispatch of MixtralExperts.forward; "torch sort" is the fastest
plain-torch formulation we know (softmax, topk, a stable sort of the flat ids for the plan).
A second table routes DeepSeek-V3's way (ops.route_spec: sigmoid, selection bias, expert groups)
against DeepseekV3TopkRouter + DeepseekV3Experts' dispatch (hf_routers.py).

    python benchmarks/bench_route.py [--quick]
"""

from __future__ import annotations

import argparse

import torch

import moe_fast  # noqa: F401
from hf_routers import deepseek_v3_route_dispatch
from moe_fast import ops
from moe_fast.kernels.routing_spec import RoutingSpec
from timing import format_table, machine_line, median_seconds


def transformers_route_dispatch(logits: torch.Tensor, k: int, beta: float | None):
    E = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    if beta is not None:  # the paper's rule, in plain torch: mark skipped slots with E
        skip = top < beta * top[:, :1]
        skip[:, 0] = False
        idx = idx.masked_fill(skip, E)
        top = top.masked_fill(skip, 0.0)
        top = top / top.sum(-1, keepdim=True)
    mask = torch.nn.functional.one_hot(idx, num_classes=E + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    plan = [torch.where(mask[e[0]]) for e in hit if e[0] != E]
    return top, idx, plan


def torch_sort_route(logits: torch.Tensor, k: int, beta: float | None):
    E = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    if beta is not None:
        skip = top < beta * top[:, :1]
        skip[:, 0] = False
        idx = idx.masked_fill(skip, E)
        top = top.masked_fill(skip, 0.0)
    top = top / top.sum(-1, keepdim=True)
    flat = idx.reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E + 1)
    return top, idx, perm, counts


def deepseek_v3_rows(quick: bool) -> list[list]:
    """DeepSeek-V3-shaped routing (256 experts, top-8, 8 groups, topk_group 4, a selection bias,
    routed_scaling_factor 2.5) against DeepseekV3TopkRouter + one_hot/where (hf_routers.py)."""
    E, k, n_group, topk_group, scaling = 256, 8, 8, 4, 2.5
    bias = torch.randn(E) * 0.05
    spec = RoutingSpec("sigmoid", k, True, scaling, bias, n_group, topk_group)
    rows = []
    for T in [1, 64, 4096] if quick else [1, 64, 4096, 32768]:
        logits = torch.randn(T, E) * 2
        got = ops.route_spec(logits, spec)
        _, want_ids, _ = deepseek_v3_route_dispatch(logits, bias, n_group, topk_group, k, scaling)
        assert torch.equal(got.ids.long().sort(-1).values, want_ids.sort(-1).values), "DeepSeek-V3 selection differs"
        reps = 3 if quick or T > 4096 else 10
        t_hf = median_seconds(lambda: deepseek_v3_route_dispatch(logits, bias, n_group, topk_group, k, scaling), reps)
        t_op = median_seconds(lambda: ops.route_spec(logits, spec), reps)
        rows.append([E, T, t_hf * 1e6, t_op * 1e6, t_hf / t_op])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = parser.parse_args()
    sizes = [1, 64, 4096] if args.quick else [1, 64, 4096, 32768]
    rows = []
    for E in (8, 64):
        for T in sizes:
            for beta in (None, 0.5):
                logits = torch.randn(T, E) * 2
                reps = 10 if args.quick else (50 if T <= 4096 else 10)
                t_hf = median_seconds(lambda: transformers_route_dispatch(logits, 2, beta), reps)
                t_sort = median_seconds(lambda: torch_sort_route(logits, 2, beta), reps)
                t_op = median_seconds(lambda: ops.route(logits, 2, True, beta), reps)
                skipped = 0.0 if beta is None else float((ops.route(logits, 2, True, beta).ids == E).float().mean() * 2)
                rows.append(
                    [E, T, "-" if beta is None else f"{beta} ({skipped:.0%} skip)", t_hf * 1e6, t_sort * 1e6,
                     t_op * 1e6, t_hf / t_op, t_sort / t_op]
                )
    print(f"route + dispatch plan, k=2, float32 logits; {machine_line()}; median microseconds")
    print(
        format_table(
            ["E", "T", "beta", "transformers us", "torch sort us", "moe_fast us", "x vs transformers", "x vs torch sort"],
            rows,
        )
    )

    print()
    print("DeepSeek-V3 routing + dispatch plan: sigmoid, bias, 8 groups (4 eligible), k=8, float32 logits; median microseconds")
    print(format_table(["E", "T", "transformers us", "moe_fast us", "x vs transformers"], deepseek_v3_rows(args.quick)))


if __name__ == "__main__":
    main()
