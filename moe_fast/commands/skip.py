"""``moe-fast skip MODEL --calib SPEC --out DIR [--quantile 0.5]``: calibrate dynamic skipping.

Measures per-layer betas on calibration tokens and writes a checkpoint that remembers them
(``config.json``: ``"moe_fast": {"skipping": ...}``); ``moe_fast.from_pretrained(DIR)`` loads it
with skipping on. The weights are not changed, so a local checkpoint is copied file by file and
only its config.json is rewritten. ``skip_checkpoint`` is the same step for other commands
(``moe-fast prune ... --skip`` runs it on the pruned checkpoint, in place).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from moe_fast.commands import calib_help, model_help
from moe_fast.staging import staged_directory

log = logging.getLogger(__name__)

REPORT_NAME = "moe_fast_skip.json"


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
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; a .pt is used whole)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32", "float16"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = skip_checkpoint(
        args.model, args.calib, args.out, quantile=args.quantile, n_samples=args.n_samples, seq_len=args.seq_len,
        batch_size=args.batch_size, seed=args.seed, device=args.device, dtype=args.dtype, progress=not args.no_progress,
    )
    print(report["table"])
    print(f"expert calls saved on the calibration data: {report['saved_fraction_mean']:.1%}")
    print(f"checkpoint with skipping: {args.out}  (load with moe_fast.from_pretrained)")
    return 0


def _load_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # no tokenizer files: a .pt spec still works
        log.debug("no tokenizer for %s: %s", path, err)
        return None


def skip_checkpoint(
    model_path: str | os.PathLike,
    calibration,
    out: str | os.PathLike,
    *,
    quantile: float = 0.5,
    n_samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 4,
    seed: int = 42,
    device: str = "cpu",
    dtype: str = "auto",
    progress: bool = True,
) -> dict:
    """Calibrates betas of the checkpoint ``model_path`` and writes it to ``out`` with them recorded.

    ``out`` may equal ``model_path`` (only config.json is rewritten, atomically). ``n_samples`` x
    ``seq_len`` default to 32 x 512 for text, the whole tensor for ids. Returns the report (also
    written to ``out/moe_fast_skip.json``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from moe_fast import patching, saving
    from moe_fast.calibration import calibration_fingerprint, load_calibration
    from moe_fast.checkpoint_check import verify_checkpoint
    from moe_fast.models import quiet_loading, resolve_model
    from moe_fast.skipping import calibrate_skipping

    model_path, out = resolve_model(os.fspath(model_path)), Path(out)
    in_place = out.exists() and Path(model_path).exists() and out.resolve() == Path(model_path).resolve()
    if out.exists() and any(out.iterdir()) and not in_place:
        raise FileExistsError(f"output directory {out} exists and is not empty")
    if os.path.isdir(model_path):
        verify_checkpoint(model_path)  # a truncated or corrupt file: one clear error, nothing written
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device).eval()
    tokenizer = None
    if isinstance(calibration, str) and not calibration.lower().endswith(".pt"):
        tokenizer = _load_tokenizer(model_path)
        n_samples = 32 if n_samples is None else n_samples
        seq_len = 512 if seq_len is None else seq_len
    ids = load_calibration(calibration, tokenizer, n_samples, seq_len, seed)
    cal = calibrate_skipping(model, ids, quantile=quantile, batch_size=batch_size, progress=progress)
    patching.patch(model, betas=cal)
    record = getattr(model.config, patching.CONFIG_KEY)[patching.RECORD_KEY]
    report = {
        "model": model_path,
        "calibration": {
            "spec": calibration if isinstance(calibration, str) else "tensor",
            "n_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "seed": seed,
            "fingerprint": calibration_fingerprint(ids),
        },
        **cal.to_dict(),
        "saved_fraction_mean": sum(cal.saved_fraction) / len(cal.saved_fraction),
        "table": cal.table(),
    }
    report_text = json.dumps(report, indent=2)

    if not Path(model_path).is_dir():  # a hub name: write the loaded model
        saving.save(model, out, tokenizer=tokenizer, overwrite=False, extra_files={REPORT_NAME: report_text})
        return report
    if in_place:
        _rewrite_config(out, record)
        _write_atomic(out / REPORT_NAME, report_text)
        return report
    with staged_directory(out) as stage:
        tmp = Path(stage)
        shutil.copytree(model_path, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(REPORT_NAME))
        _rewrite_config(tmp, record)
        (tmp / REPORT_NAME).write_text(report_text)
    return report


def _rewrite_config(directory: Path, skipping: dict) -> None:
    """Sets config.json's moe_fast.skipping, keeping everything else (e.g. moe_fast.pruning)."""
    from moe_fast.patching import CONFIG_KEY, RECORD_KEY

    path = directory / "config.json"
    config = json.loads(path.read_text())
    entry = config.get(CONFIG_KEY)
    entry = dict(entry) if isinstance(entry, dict) else {}
    entry[RECORD_KEY] = skipping
    config[CONFIG_KEY] = entry
    _write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
