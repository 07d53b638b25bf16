"""``moe-fast eval MODEL --data SPEC [--data SPEC ...] [--tasks T1,T2] [--base ORIGINAL] [--skip] [--json PATH]``.

Perplexity on held-out text, greedy tokens/s, peak memory, parameters, size on disk, and the
skip rate when the model skips. MODEL is a checkpoint directory, a hub id, or a model shipped
with moe_fast (``builtin:small-mixtral``, see ``moe_fast.models.BUILTIN_MODELS``).
``--tasks``: accuracy through lm-evaluation-harness on the model as moe_fast loaded it
(:mod:`moe_fast.evaluation.tasks.harness`). ``--base``: KL divergence, top-1 agreement and perplexity
ratio against the original model on the ``--data`` text (:mod:`moe_fast.evaluation.comparison`).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from moe_fast.commands import builtin_corpora_text, model_help
from moe_fast.checkpoint.loading import DTYPES
from moe_fast.checkpoint.preflight import check_device

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
        default=None,
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
    g = p.add_argument_group("accuracy through lm-evaluation-harness (needs moe_fast[eval]; never downloads)")
    g.add_argument("--tasks", default=None, metavar="T1,T2", help="lm-eval tasks, comma-separated: the built-in "
                   "moe_fast_next_line and moe_fast_docstring (from the stdlib test modules), lm-eval's own tasks "
                   "whose data are in the local datasets cache, or tasks of --include-path")
    g.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per item (lm-eval's default: 0)")
    g.add_argument("--limit", default=None, help="items per task: a count (>= 1) or a fraction in (0, 1)")
    g.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of lm-eval task YAMLs (over local json/jsonl files); repeat for several")
    g.add_argument("--task-batch-size", type=int, default=16, help="lm-eval batch size (default 16)")
    c = p.add_argument_group("against the original model (with --data)")
    c.add_argument("--base", default=None, metavar="ORIGINAL", help="the unpruned model: report mean and 99th-"
                   "percentile KL(original || MODEL) per token, top-1 agreement and the perplexity ratio on --data, "
                   "loading one model at a time")
    c.add_argument("--kl-top", type=int, default=256, help="with --base: log-probabilities of the original kept per "
                   "token (its most likely tokens, the rest as one bin; 0 keeps all); default 256")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moe_fast.evaluation.measures import data_texts, evaluate, is_skipping, load_model, write_json  # lazy: CLI start-up (the parser imports every command)

    check_device(args.device)  # before any loading: --device tpu or cuda without CUDA is one line
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = args.skip or args.beta is not None
    if args.base is not None and not args.data:
        raise ValueError("--base needs --data SPEC: the text on which MODEL is compared with the original")
    if not args.data and not args.tasks:
        raise ValueError("give --data SPEC (perplexity, speed; with --base: KL against it) and/or --tasks T1,T2 (accuracy)")
    if args.base is not None and args.tasks:
        raise ValueError("--base and --tasks: run them as two commands (--tasks scores one model)")
    prepared = limit = None
    if args.tasks:  # every task and its data checked before any model is loaded
        from moe_fast.evaluation.tasks.harness import parse_limit, prepare  # lazy: CLI start-up (the parser imports every command)

        limit = parse_limit(args.limit)
        if args.num_fewshot is not None and args.num_fewshot < 0:
            raise ValueError(f"--num-fewshot {args.num_fewshot}: give 0 or more")
        prepared = prepare([t.strip() for t in args.tasks.split(",")], args.include_path)
    elif args.limit is not None or args.num_fewshot is not None or args.include_path:
        raise ValueError("--limit, --num-fewshot and --include-path go with --tasks")
    if args.base is not None:
        return _compare(args, skip)
    model, tokenizer, path = load_model(args.model, DTYPES[args.dtype], args.device, skip=skip and args.beta is None)
    if args.beta is not None:
        from moe_fast.serving.patching import patch  # lazy: CLI start-up (the parser imports every command)

        patch(model, betas=args.beta)
    if skip:
        if not is_skipping(model):
            raise ValueError(
                f"--skip: {args.model} records no skipping betas in its config; calibrate them with "
                "`moe-fast skip MODEL --calib SPEC --out DIR` or give --beta"
            )
    result = None
    if args.data:
        data = {spec: data_texts(spec) for spec in args.data}
        result = evaluate(
            model, tokenizer, data, name=args.model, path=path, max_tokens=args.max_tokens, seq_len=args.seq_len,
            batch_size=args.batch_size, gen_prompts=args.prompts, new_tokens=args.new_tokens, measure_skips=skip,
        )
        print(result.table())
    if prepared is None:
        if args.json:
            write_json(result.to_dict(), args.json)
            log.info("wrote %s", args.json)
        else:
            log.debug("%s", json.dumps(result.to_dict()))
        return 0
    from moe_fast.evaluation.tasks.harness import metric_rows, metric_table, run_tasks, serializable  # lazy: CLI start-up (the parser imports every command)

    results = run_tasks(model, tokenizer, prepared, num_fewshot=args.num_fewshot, limit=limit,
                        batch_size=args.task_batch_size, measure_skips=skip)
    results["moe_fast"].update(model=args.model, metrics=metric_rows(results),
                               eval=None if result is None else result.to_dict())
    print(metric_table(results["moe_fast"]["metrics"], results["moe_fast"]["skip_rate"]))
    if args.json:
        write_json(serializable(results), args.json)
        log.info("wrote lm-eval's results to %s", args.json)
    return 0


def _compare(args: argparse.Namespace, skip: bool) -> int:
    """``--base``: MODEL against the original on the --data text, one model loaded at a time."""
    from moe_fast.evaluation.comparison import compare_models  # lazy: CLI start-up (the parser imports every command)
    from moe_fast.evaluation.measures import write_json  # lazy: CLI start-up (the parser imports every command)

    if args.kl_top < 0:
        raise ValueError(f"--kl-top {args.kl_top}: give 0 (keep every log-probability) or a count of tokens")
    result = compare_models(
        args.model, args.base, args.data, dtype=DTYPES[args.dtype], device=args.device, skip=skip, beta=args.beta,
        max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size, top=args.kl_top,
    )
    print(result.table())
    if args.json:
        write_json(result.to_dict(), args.json)
        log.info("wrote %s", args.json)
    return 0
