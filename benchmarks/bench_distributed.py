"""Data-parallel calibration: 1 vs 2 Gloo ranks pruning the same Mixtral-shaped checkpoint (CPU).

Builds the checkpoint of benchmarks/bench_prune.py (Mixtral-shaped, from a config), then runs
``moe-fast prune`` on it:

* 1 rank, 2 threads (the baseline: one process using both cores),
* 1 rank, 1 thread,
* 2 ranks x 1 thread under ``torchrun --nproc-per-node 2`` (Gloo; each rank holds half the
  calibration batches, the per-candidate, per-batch squared errors are summed with all_reduce).

Prints wall time (process start to exit, median over --repeat), the pruner's own time (rank 0's
report), the scaling ratio against each 1-rank run, and checks that every run selects the same
experts.

    python benchmarks/bench_distributed.py --layers 2 --n-samples 16 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_prune import add_checkpoint_arguments, build_checkpoint  # noqa: E402  (same model and tokens as the pruning benchmark)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(path: str, out: str, keep: int, batch_size: int, ranks: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT, MASTER_ADDR="127.0.0.1")
    args = ["prune", path, "--keep", str(keep), "--calib", os.path.join(path, "calib_ids.pt"), "--out", out,
            "--batch-size", str(batch_size), "--no-progress"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "moe_fast.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
               "127.0.0.1", "--master-port", str(_port()), "-m", "moe_fast.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "moe_fast_report.json")) as f:
        report = json.load(f)
    kept = {int(i): r["kept"] for i, r in report["layers"].items()}
    return {"wall": wall, "pruner": report["timings"]["total"], "kept": kept, "world_size": report["world_size"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, layers=2, n_samples=16)
    p.add_argument("--keep", type=int, default=6)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    configs = [("1 rank x 2 threads", 1, 2), ("1 rank x 1 thread", 1, 1), ("2 ranks x 1 thread (Gloo)", 2, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        build_checkpoint(args, path)
        results = {name: [] for name, _, _ in configs}
        for rep in range(args.repeat):
            for i, (name, ranks, threads) in enumerate(configs):
                results[name].append(run(path, os.path.join(tmp, f"out{rep}_{i}"), args.keep, args.batch_size, ranks, threads))
    rows = []
    for name, ranks, threads in configs:
        runs = results[name]
        rows.append({
            "config": name, "ranks": ranks, "threads_per_rank": threads,
            "wall_s": statistics.median(r["wall"] for r in runs), "pruner_s": statistics.median(r["pruner"] for r in runs),
            "kept": runs[0]["kept"], "same_across_repeats": all(r["kept"] == runs[0]["kept"] for r in runs),
        })
    base2, base1, dist2 = rows
    print(f"Mixtral-shaped: hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, top-{args.top_k}, "
          f"{args.layers} layers; {args.n_samples} x {args.seq_len} tokens, batch {args.batch_size}, keep {args.keep}; "
          f"median of {args.repeat}")
    print(f"| run | wall (s) | pruner (s) | wall speedup vs 1x2 | wall speedup vs 1x1 | kept experts |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kept = "; ".join(f"{i}: {','.join(map(str, v))}" for i, v in sorted(r["kept"].items()))
        print(f"| {r['config']} | {r['wall_s']:.1f} | {r['pruner_s']:.1f} | {base2['wall_s'] / r['wall_s']:.2f}x | "
              f"{base1['wall_s'] / r['wall_s']:.2f}x | {kept} |")
    same = all(r["kept"] == base2["kept"] and r["same_across_repeats"] for r in rows)
    print(f"scaling ratio (2 ranks vs 1 rank x 1 thread, pruner time): {base1['pruner_s'] / dist2['pruner_s']:.2f}x; "
          f"vs 1 rank x 2 threads: {base2['pruner_s'] / dist2['pruner_s']:.2f}x")
    print(f"same selections in every run: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "same": same}, f, indent=2, default=str)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
