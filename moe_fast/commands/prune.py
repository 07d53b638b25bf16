"""``moe-fast prune MODEL --keep R --calib SPEC --out DIR``: expert pruning end to end."""

from __future__ import annotations

import argparse
import os

from moe_fast.commands import calib_help, model_help
from moe_fast.commands.skip import add_skip_arguments
from moe_fast.checkpoint.preflight import check_device, check_model_dir
from moe_fast.models import resolve_model

USAGE = (
    "moe-fast prune MODEL --keep R --calib SPEC --out DIR [options]\n"
    "       moe-fast prune MODEL --keep R --plan [--json] [--n-samples N] [--seq-len L] [--mode M] [--world-size W]"
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune",
        usage=USAGE,
        help="keep R experts per MoE layer, chosen on calibration text; write a plain checkpoint",
        description="Expert pruning (Lu et al., ACL 2024): in every MoE layer keep the R experts whose "
        "layer output on calibration tokens stays closest to the unpruned one, and write the result as "
        "a checkpoint that plain transformers loads.",
    )
    p.add_argument("model", metavar="MODEL", help=model_help())
    needed = p.add_argument_group("required (--calib and --out: unless --plan)")
    needed.add_argument(
        "--keep", "-r", metavar="R", type=int, required=True,
        help="experts kept per MoE layer (R; with expert groups a multiple of n_group: see --search)",
    )
    needed.add_argument("--calib", metavar="SPEC", default=None, help=calib_help())
    needed.add_argument("--out", metavar="DIR", default=None, help="output directory (must not exist or be empty)")
    p.add_argument(
        "--plan", action="store_true",
        help="print the memory and expert-FLOP budget per layer from MODEL's config.json (no weights read) and exit",
    )
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    p.add_argument("--world-size", type=int, default=None, help="with --plan: ranks sharing the calibration (default: 1 or torchrun's)")
    p.add_argument(
        "--mode", choices=["layerwise", "progressive"], default="layerwise",
        help="layerwise (default): each layer's inputs come from the unpruned model; progressive: from the "
        "model pruned so far (the target is still the unpruned block's output)",
    )
    p.add_argument(
        "--objective", choices=["paper", "mse"], default="paper",
        help="paper (default): sum over calibration batches of the Frobenius norm of the layer output's "
        "change; mse: sum of squared errors over all tokens",
    )
    p.add_argument(
        "--search", choices=["auto", "exhaustive", "greedy", "beam"], default="auto",
        help="how the kept set is found: exhaustive (every one of the C(E, R) sets), greedy (drop the expert "
        "that costs least, one at a time), beam (the same keeping the --beam-width best sets per step), auto "
        "(default: exhaustive when C(E, R) <= 5000, else beam). Routers with expert groups (DeepSeek-V3: "
        "topk_group < n_group) keep the same number of experts in every group: R must be n_group x per_group "
        "(per_group >= 2, topk_group x per_group >= top-k); exhaustive then enumerates only such sets, and "
        "greedy/beam drop an expert only from a group with the fewest drops so far",
    )
    p.add_argument(
        "--repair", choices=["lstsq", "merge"], default=None,
        help="after each layer's selection, repair the pruned block: lstsq refits the kept experts' down "
        "projections in closed form so that the block reproduces the unpruned block's output on the "
        "calibration tokens (ridge chosen on held-out calibration sequences); merge folds each dropped "
        "expert into the kept expert whose outputs it matches best, weighted by routing mass. A repair that "
        "does not lower a layer's calibration loss is reverted (docs/REPAIR.md). Default: none",
    )
    p.add_argument("--beam-width", type=int, default=4, help="candidates kept per step with --search beam (default 4)")
    p.add_argument("--n-samples", type=int, default=None, help="calibration sequences (default 128; a .pt is used whole)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048, or the model's max_position_embeddings when smaller; a .pt is used whole)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per calibration batch (one term of the paper's sum)")
    p.add_argument(
        "--seed", type=int, default=42,
        help="seed for drawing the calibration sequences from text (and for --criterion random; default 42)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto",
        help="precision of the computation (default auto: the checkpoint's dtype)",
    )
    p.add_argument("--chunk-tokens", type=int, default=4096, help="tokens whose expert outputs are held at once")
    p.add_argument(
        "--recompute-outputs", nargs="?", const="default", default=None, metavar="D0,L",
        help="lean lazy search (greedy/beam): hold per token its Gram entries, not its expert outputs, and "
        "recompute the outputs still needed when a token's later ranks are needed. Less search memory, more "
        "expert outputs run (same selections). Optional D0,L: ranks every token starts with and ranks an "
        "extension goes past the need (default 2k+2,ceil(3k/4): 18,6 for top-8)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same settings")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--criterion",
        choices=["reconstruction", "random", "frequency", "reap", "ean", "saliency"],
        default="reconstruction",
        help="how experts are chosen: the paper's reconstruction loss (default), or: random, "
        "frequency (most often routed), reap (mean over routed tokens of routing weight x expert output norm; "
        "'saliency' is an alias), ean (mean over routed tokens of the expert output norm). Every criterion "
        "streams one layer at a time, resumes and runs under torchrun like the search; routers with expert "
        "groups keep the same number in every group",
    )
    p.add_argument("--skip", action="store_true", help="also calibrate dynamic skipping on the pruned model")
    add_skip_arguments(p, prefix="skip-")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.model = resolve_model(args.model)
    if args.plan:
        return run_plan(args)
    if args.calib is None or args.out is None:
        raise ValueError("--calib and --out are required (except with --plan)")
    check_device(args.device)
    if args.chunk_tokens < 1:
        raise ValueError(f"--chunk-tokens must be >= 1, got {args.chunk_tokens}")
    if os.path.isdir(args.model):
        check_model_dir(args.model)  # a truncated or corrupt file, a bad MXFP4 pair: one clear error, nothing written
    run_prune(args)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 wrote the checkpoint and reports
        return 0
    if args.skip:
        from moe_fast.serving.skip_export import skip_checkpoint  # lazy: CLI start-up (the parser imports every command)

        skipped = skip_checkpoint(
            args.out,
            args.calib,
            args.out,
            quantile=args.skip_quantile,
            batch_size=args.skip_batch_size,
            device=args.device or "cpu",
            dtype=args.dtype,
            **_calibration_options(args),
        )
        print(skipped["table"])
        print(f"expert calls saved on the calibration data: {skipped['saved_fraction_mean']:.1%}")
    print(f"pruned checkpoint: {args.out}")
    return 0


def _calibration_options(args: argparse.Namespace) -> dict:
    """The calibration sample and progress options that pruning, the baselines and skipping
    calibration all take from the same flags."""
    return dict(n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed, progress=not args.no_progress)


def run_prune(args: argparse.Namespace) -> None:
    """Every criterion through ``moe_fast.prune``; under torchrun (WORLD_SIZE > 1) the ranks share
    the calibration batches (NCCL/Gloo)."""
    from moe_fast.pruning import distributed, prune  # lazy: CLI start-up (the parser imports every command)

    device = distributed.init_from_env(args.device)
    finished = False
    try:
        report = _prune(args, prune, device)
        finished = True
    finally:
        distributed.shutdown(wait_for_peers=finished)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report.table())


def _recompute(value: str | None) -> bool | tuple[int, int]:
    """--recompute-outputs: absent -> False, bare -> True, "D0,L" -> (D0, L)."""
    if value is None:
        return False
    if value == "default":
        return True
    try:
        first, ahead = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"--recompute-outputs takes D0,L (two integers), got {value!r}") from None
    return first, ahead


def _prune(args: argparse.Namespace, prune, device):
    from moe_fast.pruning.distributed import RankFailed  # lazy: CLI start-up (the parser imports every command)

    try:
        _, report = prune(
            args.model,
            args.calib,
            args.keep,
            out=args.out,
            mode=args.mode,
            objective=args.objective,
            search=args.search,
            beam_width=args.beam_width,
            batch_size=args.batch_size,
            device=device,
            dtype=args.dtype,
            resume=args.resume,
            chunk_tokens=args.chunk_tokens,
            return_model=False,
            recompute_outputs=_recompute(args.recompute_outputs),
            repair=args.repair,
            criterion=args.criterion,
            **_calibration_options(args),
        )
    except RankFailed as err:
        raise ValueError(str(err)) from err  # reported as a command error (exit status 2)
    return report


def run_plan(args: argparse.Namespace) -> int:
    from moe_fast.pruning.plan import plan_json, plan_table, prune_plan  # lazy: CLI start-up (the parser imports every command)

    plan = prune_plan(
        args.model,
        args.keep,
        n_samples=args.n_samples or 128,
        seq_len=args.seq_len or 2048,
        batch_size=args.batch_size,
        mode=args.mode,
        dtype=args.dtype,
        chunk_tokens=args.chunk_tokens,
        world_size=args.world_size or int(os.environ.get("WORLD_SIZE", "1")),
    )
    print(plan_json(plan) if args.json else plan_table(plan))
    return 0
