"""Calibrating dynamic skipping on a checkpoint and writing a copy that remembers the betas.

The weights are not changed, so a local checkpoint is copied file by file and only its
config.json is rewritten (``"moe_fast": {"skipping": ...}``); ``moe_fast.from_pretrained(DIR)``
loads it with skipping on. Used by ``moe-fast skip`` and by ``moe-fast prune ... --skip`` (on the
pruned checkpoint, in place).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from moe_fast.serving import saving
from moe_fast.serving.betas import skipping_record
from moe_fast.data.calibration import calibration_fingerprint, load_calibration
from moe_fast.checkpoint.config_record import CONFIG_KEY, SKIPPING_KEY, merged_record, set_record_entry
from moe_fast.checkpoint.loading import from_pretrained_dtype, load_pretrained, load_tokenizer
from moe_fast.checkpoint.preflight import check_device, check_model_dir, model_limits
from moe_fast.models import quiet_loading, resolve_model
from moe_fast.serving.skipping import calibrate_skipping
from moe_fast.checkpoint.staging import staged_directory

REPORT_NAME = "moe_fast_skip.json"


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
    from transformers import AutoConfig

    model_path, out = resolve_model(os.fspath(model_path)), Path(out)
    in_place = out.exists() and Path(model_path).exists() and out.resolve() == Path(model_path).resolve()
    if out.exists() and any(out.iterdir()) and not in_place:
        raise FileExistsError(f"output directory {out} exists and is not empty")
    check_device(device)
    if os.path.isdir(model_path):
        check_model_dir(model_path)  # a truncated or corrupt file, a bad MXFP4 pair: one clear error, nothing written
    tokenizer = None
    with quiet_loading():
        vocab_size, max_positions = model_limits(AutoConfig.from_pretrained(model_path))
    if isinstance(calibration, str) and not calibration.lower().endswith(".pt"):
        tokenizer = load_tokenizer(model_path)
        n_samples = 32 if n_samples is None else n_samples
        seq_len = min(512, max_positions or 512) if seq_len is None else seq_len
    # The calibration ids are checked against the config before the weights load.
    ids = load_calibration(calibration, tokenizer, n_samples, seq_len, seed, vocab_size, max_positions)
    with quiet_loading():
        model = load_pretrained(model_path, dtype=from_pretrained_dtype(dtype)).to(device).eval()
    cal = calibrate_skipping(model, ids, quantile=quantile, batch_size=batch_size, progress=progress)
    record = skipping_record(cal, cal.layers, cal.top_k)  # the layers the calibration measured
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
        set_record_entry(model.config, SKIPPING_KEY, record)
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
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config[CONFIG_KEY] = merged_record(config.get(CONFIG_KEY), SKIPPING_KEY, skipping)
    _write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
