"""``moe-fast demo [--out DIR] [--quick] [--model builtin:small-qwen3-moe]``: the paper's comparison on a shipped model.

No GPU, no network: the model and the data come with the package. Prints the table and writes
``report.md``, ``report.json`` and a PNG plot to DIR (see :mod:`moe_fast.demo`).
"""

from __future__ import annotations

import argparse
import logging

import torch

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="prune and skip a shipped small MoE on built-in data; print the paper-style table",
        description="Compares the paper's reconstruction-loss pruning (layer-wise and progressive, or greedy and beam "
        "search on wide models) with the frequency, REAP, EAN and random criteria at several r, task-agnostic (prose) "
        "and task-specific (code) calibration on several calibration samples, the least-squares and merge repairs "
        "(prune(..., repair=...)) of the reconstruction selection at the middle r, dynamic skipping alone and with "
        "pruning; evaluates each (perplexity and KL from the unpruned model on the prose and code test splits, accuracy "
        "on 64 items of each built-in task moe_fast_next_line and moe_fast_docstring, expert FLOPs per token, size) and writes report.md, report.json and a plot.",
    )
    p.add_argument("--out", default="moe_fast_demo", help="report directory (must not exist or be empty)")
    p.add_argument("--quick", action="store_true", help="a shortened run (a test of the pipeline, not results)")
    p.add_argument(
        "--model", default="builtin:small-mixtral",
        help="model to use: builtin:small-mixtral (default; 8 experts, top-2) or builtin:small-qwen3-moe "
        "(fine-grained), or a checkpoint directory",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--keep-checkpoints", action="store_true", help="also write the seed-0 pruned checkpoints under DIR/checkpoints")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_fast.demo import Settings, run_demo  # lazy: CLI start-up (the parser imports every command)

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.quick_settings(args.model) if args.quick else Settings(model=args.model)
    report = run_demo(args.out, settings, keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress)
    print(report["table"])
    print()
    for line in report["findings"]:
        print("-", line)
    print(f"\nreport: {args.out}/report.md, report.json, perplexity_vs_experts.png ({report['total_seconds']:.0f} s)")
    return 0
