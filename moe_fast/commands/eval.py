"""``moe-fast eval MODEL --data SPEC [--data SPEC ...] [--skip] [--json PATH]``.

Perplexity on held-out text, greedy tokens/s, peak memory, parameters, size on disk, and the
skip rate when the model skips. MODEL is a checkpoint directory, a hub id, or a model shipped
with moe_fast (``builtin:small-mixtral``, see ``moe_fast.models.BUILTIN_MODELS``).
"""

from __future__ import annotations

import argparse
import json
import logging

from moe_fast.commands import builtin_corpora_text, model_help

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity, tokens/s, memory and size of a (pruned / skipping) model",
        description="Evaluate a causal MoE LM: perplexity on held-out text (non-overlapping windows), tokens/s of "
        "greedy generation, peak memory, parameter count, size on disk, and the measured skip rate with --skip.",
    )
    p.add_argument("model", metavar="MODEL", help=model_help() + "; or a hub id")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="SPEC",
        help=f"held-out text: a built-in corpus ({builtin_corpora_text()}; its test split, add :train or :calib "
        "for another), or a .txt / .jsonl file; repeat for several",
    )
    p.add_argument("--skip", action="store_true", help="dynamic skipping: load with the betas recorded in the "
                   "model's config (moe-fast skip writes them); with --beta, patch with that threshold instead")
    p.add_argument("--beta", type=float, default=None, help="one skip threshold for every layer (implies --skip)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens scored per data set (default 16384)")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity window (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt for tokens/s")
    p.add_argument("--prompts", type=int, default=3, help="prompts for tokens/s (0: skip the speed test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_fast.evaluation import data_texts, evaluate, load_model, write_json
    from moe_fast.loading import DTYPES

    from moe_fast.model_checks import check_device

    check_device(args.device)  # before any loading: --device tpu or cuda without CUDA is one line
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = args.skip or args.beta is not None
    model, tokenizer, path = load_model(args.model, DTYPES[args.dtype], args.device, skip=skip and args.beta is None)
    if args.beta is not None:
        from moe_fast.patching import patch

        patch(model, betas=args.beta)
    if skip:
        from moe_fast.evaluation import is_skipping

        if not is_skipping(model):
            raise ValueError(
                f"--skip: {args.model} records no skipping betas in its config; calibrate them with "
                "`moe-fast skip MODEL --calib SPEC --out DIR` or give --beta"
            )
    data = {spec: data_texts(spec) for spec in args.data}
    result = evaluate(
        model, tokenizer, data, name=args.model, path=path, max_tokens=args.max_tokens, seq_len=args.seq_len,
        batch_size=args.batch_size, gen_prompts=args.prompts, new_tokens=args.new_tokens, measure_skips=skip,
    )
    print(result.table())
    if args.json:
        write_json(result.to_dict(), args.json)
        log.info("wrote %s", args.json)
    else:
        log.debug("%s", json.dumps(result.to_dict()))
    return 0
