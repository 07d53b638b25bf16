"""bench_route's Mixtral row (T = 4096, E = 8, k = 2, softmax, renormalized) at one CPU level.

Run it once per level, interleaved, and take medians across runs: the level is fixed per process
(ATEN_CPU_CAPABILITY for PyTorch and, unless MOE_FAST_CPU_CAPABILITY says otherwise, for
moe_fast; ONEDNN_MAX_CPU_ISA for oneDNN). Prints one line of microseconds.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_route_levels.py
"""

from __future__ import annotations

import argparse

import torch

import moe_fast  # noqa: F401
from bench_route import transformers_route_dispatch
from moe_fast import _C, ops
from timing import median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    logits = torch.randn(args.tokens, args.experts) * 2
    level = getattr(_C, "route_cpu_capability", lambda: "default (before)")()
    for beta in (None, 0.5):
        t_hf = median_seconds(lambda: transformers_route_dispatch(logits, 2, beta), args.repeats)
        t_op = median_seconds(lambda: ops.route(logits, 2, True, beta), args.repeats)
        print(
            f"torch={torch.backends.cpu.get_cpu_capability()} moe_fast={level} beta={beta} "
            f"transformers_us={t_hf * 1e6:.1f} moe_fast_us={t_op * 1e6:.1f} ratio={t_hf / t_op:.2f}"
        )


if __name__ == "__main__":
    main()
