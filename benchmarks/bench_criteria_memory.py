"""Peak resident memory of every selection criterion through ``moe_fast.prune``, against depth.

Builds Mixtral-shaped checkpoints of 2 and 8 decoder layers (default: hidden 512, expert width
1792, 8 experts top-2, bfloat16: the 8-layer one holds 0.35 GB of weights), then prunes each to
6 experts per layer in a fresh process per run (VmHWM is per process) with the reconstruction
search and with every statistic criterion, all streaming one decoder layer at a time. Prints
peak RSS per criterion and depth, the criterion/reconstruction ratio at the deeper checkpoint and
the growth from 2 to 8 layers (the whole model in float32 would add 6 layers' weights).

    python benchmarks/bench_criteria_memory.py
    python benchmarks/bench_criteria_memory.py --n-samples 8 --seq-len 128   # a shorter run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from bench_prune import add_checkpoint_arguments, build_checkpoint
from child_process import run_json_child

CRITERIA = ("reconstruction", "reap", "ean", "frequency", "random")


def run_child(path: str, criterion: str, keep: int, batch_size: int, dtype: str) -> dict:
    import moe_fast
    from moe_fast.host.ram import peak_rss_bytes

    out = tempfile.mkdtemp(prefix="bench_criteria_out_")
    os.rmdir(out)
    t0 = time.perf_counter()
    report = moe_fast.prune(path, os.path.join(path, "calib_ids.pt"), keep, out=out, batch_size=batch_size,
                            criterion=criterion, dtype=dtype, return_model=False, progress=False).report
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "kept": {str(i): k for i, k in report.kept.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, layers=8, n_samples=32)
    p.set_defaults(hidden=512, ffn=1792, seq_len=256)
    p.add_argument("--shallow", type=int, default=2, help="layers of the shallow checkpoint")
    p.add_argument("--keep", type=int, default=6)
    p.add_argument("--dtype", default="auto", help="the runs' compute dtype (auto: the checkpoint's, bfloat16)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(args.path, args.child, args.keep, args.batch_size, args.dtype)))
        return
    import torch

    work = tempfile.mkdtemp(prefix="bench_criteria_")
    rows = []
    try:
        paths = {}
        for layers in (args.shallow, args.layers):
            paths[layers] = os.path.join(work, f"L{layers}")
            build_checkpoint(argparse.Namespace(**{**vars(args), "layers": layers}), paths[layers])
            _to_bfloat16(paths[layers], torch)
        for criterion in CRITERIA:
            row = {"criterion": criterion}
            for layers, path in paths.items():
                got = run_json_child(__file__, "--child", criterion, "--path", path, "--keep", str(args.keep),
                                     "--batch-size", str(args.batch_size), "--dtype", args.dtype)
                row[layers] = got
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next(r for r in rows if r["criterion"] == "reconstruction")[args.layers]["peak_rss"]
    mib = 2**20
    print(f"{'criterion':<15} {f'{args.shallow} layers MiB':>14} {f'{args.layers} layers MiB':>14} {'growth':>8} "
          f"{'x reconstruction':>17} {'seconds':>8}")
    for r in rows:
        lo, hi = r[args.shallow]["peak_rss"], r[args.layers]["peak_rss"]
        print(f"{r['criterion']:<15} {lo / mib:>14.0f} {hi / mib:>14.0f} {(hi - lo) / lo:>+8.1%} {hi / base:>17.2f} "
              f"{r[args.layers]['seconds']:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


def _to_bfloat16(path: str, torch) -> None:
    """Rewrites the float32 checkpoint in bfloat16, as released MoE checkpoints are stored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.load(os.path.join(path, "calib_ids.pt"))
    shutil.rmtree(path)
    model.save_pretrained(path, max_shard_size="500MB")
    torch.save(ids, os.path.join(path, "calib_ids.pt"))


if __name__ == "__main__":
    main()
