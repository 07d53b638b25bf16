"""``moe-fast skip MODEL --calib SPEC --out DIR [--quantile 0.5]``: calibrate dynamic skipping.

Measures per-layer betas on calibration tokens and writes a checkpoint that remembers them
(``config.json``: ``"moe_fast": {"skipping": ...}``); ``moe_fast.from_pretrained(DIR)`` loads it
with skipping on. The work is :func:`moe_fast.serving.skip_export.skip_checkpoint`.
"""

from __future__ import annotations

import argparse
import sys

from moe_fast.commands import calib_help, model_help

# Skipping lives in moe_fast, not in the checkpoint's weights: stock engines serve it unskipped.
STOCK_VLLM_WARNING = (
    "warning: the skipping is applied by moe_fast: vLLM skips only where moe_fast is installed beside it "
    "(its plugin); stock vLLM (or transformers without moe_fast.from_pretrained) serves this checkpoint "
    "without skipping"
)


def add_skip_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The calibration options of skipping (``prefix`` e.g. "skip-" when another command hosts them)."""
    p.add_argument(f"--{prefix}quantile", type=float, default=0.5, help="beta = this quantile of w_j / w_0 (default 0.5)")
    p.add_argument(f"--{prefix}batch-size", type=int, default=4, help="sequences per forward while calibrating")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "skip",
        help="calibrate dynamic expert skipping; write a checkpoint that loads with it on",
        description="Dynamic expert skipping (Lu et al., ACL 2024): a token's j-th expert is skipped when its "
        "routing weight is below beta times the first one's; beta of each layer is a quantile of that ratio on "
        "calibration tokens. Writes a copy of the checkpoint whose config.json records the betas; load it with "
        "moe_fast.from_pretrained(DIR).",
    )
    p.add_argument("model", metavar="MODEL", help=model_help() + "; or a hub name")
    p.add_argument("--calib", metavar="SPEC", required=True, help=calib_help())
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty; may be MODEL itself)")
    add_skip_arguments(p)
    p.add_argument("--n-samples", type=int, default=None, help="calibration sequences (default 32; a .pt is used whole)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512, or the model's max_position_embeddings when smaller; a .pt is used whole)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_fast.serving.skip_export import skip_checkpoint  # lazy: CLI start-up (the parser imports every command)

    report = skip_checkpoint(
        args.model, args.calib, args.out, quantile=args.quantile, n_samples=args.n_samples, seq_len=args.seq_len,
        batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype, progress=not args.no_progress,
    )
    print(report["table"])
    print(f"expert calls saved on the calibration data: {report['saved_fraction_mean']:.1%}")
    print(f"checkpoint with skipping: {args.out}  (load with moe_fast.from_pretrained)")
    print(STOCK_VLLM_WARNING, file=sys.stderr)
    return 0
