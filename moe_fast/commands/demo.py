"""``moe-fast demo [--out DIR] [--quick]``: the paper's comparison on the shipped small Mixtral.

No GPU, no network: the model and the data come with the package. Prints the table and writes
``report.md``, ``report.json`` and a PNG plot to DIR (see :mod:`moe_fast.demo`).
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="prune and skip the shipped small Mixtral on built-in data; print the paper-style table",
        description="Runs unpruned, layer-wise and progressive pruning, task-specific pruning, dynamic skipping and "
        "the random / frequency / saliency baselines on the shipped small Mixtral with built-in data, evaluates "
        "each (perplexity on prose and code, tokens/s, size) and writes report.md, report.json and a plot.",
    )
    p.add_argument("--out", default="moe_fast_demo", help="report directory (must not exist or be empty)")
    p.add_argument("--quick", action="store_true", help="a shortened run (a test of the pipeline, not results)")
    p.add_argument("--model", default="builtin:small-mixtral", help="model to use (default: the shipped one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every pruned checkpoint under DIR/checkpoints")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_fast.demo import Settings, run_demo

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
