"""Dequantizing one gpt-oss layer's MXFP4 experts: moe_fast.checkpoint.mxfp4 against transformers' helper.

Random blocks and scales of one projection (default: gpt-oss-20b's gate_up, 32 experts of
5760 rows x 2880 values) are dequantized to bf16 by ``moe_fast.checkpoint.mxfp4.dequantize`` (one expert at a
time) and by transformers' ``convert_moe_packed_tensors`` (the whole tensor at once), each in its
own process (benchmarks/child_process.py). Prints whether the results are bit-identical, the
result's size, each one's peak resident memory above its inputs and the time ratio of the two
(same machine, same run).

    python benchmarks/bench_mxfp4_dequantize.py                    # gpt-oss-20b gate_up
    python benchmarks/bench_mxfp4_dequantize.py --experts 128      # gpt-oss-120b gate_up
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def child(which: str, experts: int, rows: int, groups: int) -> None:
    import torch

    from moe_fast.checkpoint import mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 130, (experts, rows, groups), generator=g, dtype=torch.uint8)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if which == "moe_fast":
        weight = mxfp4.dequantize(blocks, scales, torch.bfloat16)
    else:
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        weight = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    digest = hashlib.sha256(weight.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()
    print(json.dumps({"seconds": seconds, "peak_above_inputs_bytes": (peak - base) * 1024,
                      "result_bytes": weight.numel() * 2, "shape": list(weight.shape), "sha256": digest}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--rows", type=int, default=5760, help="2I for gate_up, H for down")
    parser.add_argument("--groups", type=int, default=90, help="blocks of 32 per row (H/32 or I/32)")
    parser.add_argument("--child", choices=["moe_fast", "transformers"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.experts, args.rows, args.groups)
        return
    from child_process import run_json_child

    shape = [str(args.experts), str(args.rows), str(args.groups)]
    flags = ["--experts", shape[0], "--rows", shape[1], "--groups", shape[2]]
    ours = run_json_child(__file__, "--child", "moe_fast", *flags)
    theirs = run_json_child(__file__, "--child", "transformers", *flags)
    gib = 2**30
    print(f"blocks [{', '.join(shape)}, 16] -> bf16 {ours['shape']} ({ours['result_bytes'] / gib:.2f} GiB)")
    print(f"bit-identical: {ours['sha256'] == theirs['sha256']}")
    for name, r in (("moe_fast", ours), ("transformers", theirs)):
        print(f"{name:>12}: peak above inputs {r['peak_above_inputs_bytes'] / gib:.2f} GiB, {r['seconds']:.2f} s")
    print(f"time ratio moe_fast / transformers: {ours['seconds'] / theirs['seconds']:.2f}")
    if ours["sha256"] != theirs["sha256"]:
        sys.exit("results differ")


if __name__ == "__main__":
    main()
