"""``moe_fast::grouped_matmul`` and its weight gradient (the fixed-shape expert path that
torch.compile traces) against their plain-PyTorch references in the same run.

The references gather one weight matrix per row (bmm), the way the spec is written; the ops run one
matmul per expert group. Rows are top-k slots of T tokens sorted by expert (a quarter of the slots
skipped: rows past ``ends[-1]``, which the forward returns as 0). Median wall time, one thread by
default (``--threads``).

    python benchmarks/bench_grouped_matmul.py [--tokens 64 512] [--hidden 1024] [--ffn 3584] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

import moe_fast  # noqa: F401  (registers the ops)
from moe_fast import reference
from timing import format_table, median_seconds


def inputs(tokens: int, experts: int, top_k: int, d_in: int, d_out: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    slots = tokens * top_k
    active = slots - slots // 4
    ids = torch.randint(0, experts, (active,), generator=gen).sort().values
    ends = torch.bincount(ids, minlength=experts).cumsum(0)
    x = torch.randn(slots, d_in, generator=gen).to(dtype)
    weight = (torch.randn(experts, d_in, d_out, generator=gen) / d_in**0.5).to(dtype)
    grad = torch.randn(slots, d_out, generator=gen).to(dtype)
    return x, weight, ends, grad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3584)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for tokens in args.tokens:
        x, weight, ends, grad = inputs(tokens, args.experts, args.top_k, args.hidden, args.ffn, dtype)
        with torch.no_grad():
            op = median_seconds(lambda: torch.ops.moe_fast.grouped_matmul(x, weight, ends), args.repeats)
            ref = median_seconds(lambda: reference.grouped_matmul(x, weight, ends), args.repeats)
            gop = median_seconds(lambda: torch.ops.moe_fast.grouped_matmul_weight_grad(x, grad, ends), args.repeats)
            gref = median_seconds(lambda: reference.grouped_matmul_weight_grad(x, grad, ends), args.repeats)
        rows.append([tokens, x.shape[0], int(ends[-1]), f"{op * 1e3:.2f}", f"{ref * 1e3:.2f}", f"{ref / op:.1f}x",
                     f"{gop * 1e3:.2f}", f"{gref * 1e3:.2f}", f"{gref / gop:.1f}x"])
    print(f"E={args.experts}, top-{args.top_k}, [{args.hidden} -> {args.ffn}], {args.dtype}, {args.threads} thread(s); ms, median of {args.repeats}")
    print(format_table(["tokens", "rows", "active rows", "op ms", "reference ms", "op speed-up",
                        "weight grad op ms", "weight grad reference ms", "grad speed-up"], rows))


if __name__ == "__main__":
    main()
