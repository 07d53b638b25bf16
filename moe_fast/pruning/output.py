"""What a pruning run leaves behind: the pruned checkpoint with its report, and the pruned model.

The checkpoint is written into a fresh directory beside ``out`` (``moe_fast.checkpoint.staging.staged_directory``),
verified there (every shard its index names present, with its tensors and size; config and
report present) and only then moved to ``out`` in one rename: ``out`` never holds a partial export.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Callable

import torch
from torch import nn

from moe_fast.pruning import export
from moe_fast.checkpoint import loading
from moe_fast.checkpoint.verify import verify_checkpoint
from moe_fast.models import quiet_loading
from moe_fast.pruning.memory import Timings, peak_memory
from moe_fast.pruning.progress import naming_errors
from moe_fast.pruning.repair import apply_repaired
from moe_fast.pruning.report import REPORT_NAME, PruneReport
from moe_fast.pruning.source import LayerSource
from moe_fast.checkpoint.staging import staged_directory


def finish_report(report: PruneReport, clock: Timings, device: torch.device) -> None:
    """The run's total time and peak memory, taken last so that they cover the export."""
    clock.mark("total")
    report.timings = clock.seconds
    report.peak_memory_bytes, report.settings["peak_memory_kind"] = peak_memory(device)


def export_pruned(
    out: str, report: PruneReport, clock: Timings, device: torch.device, write_weights: Callable[[str], None]
) -> None:
    """``write_weights(directory)`` writes the checkpoint; the report goes beside it, then all moves to ``out``."""
    with staged_directory(out) as stage:
        with naming_errors(stage):
            with clock.measure("export"):
                write_weights(stage)
            finish_report(report, clock, device)
            report.save(os.path.join(stage, REPORT_NAME))
        verify_export(stage)


def completed_output(out: str, settings: dict) -> PruneReport:
    """The report of ``out`` when it already holds this run's verified export (a run killed after
    its final rename); otherwise FileExistsError saying why ``out`` is not taken as done."""
    try:
        verify_export(out)
        report = PruneReport.load(os.path.join(out, REPORT_NAME))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FileExistsError(
            f"output directory {out} exists and is not empty (and is not a complete pruned checkpoint: {err})"
        ) from None
    done = {k: v for k, v in report.settings.items() if k != "peak_memory_kind"}
    if done != json.loads(json.dumps(settings)):
        raise FileExistsError(f"output directory {out} exists and is not empty (it holds a pruned checkpoint made with other settings)")
    return report


def checkpoint_writer(
    source: LayerSource, model: nn.Module | None, report: PruneReport, tokenizer, repaired: dict | None = None
) -> Callable[[str], None]:
    """A loaded (already pruned, and repaired in place) model is saved; a checkpoint source is pruned
    shard by shard, with ``repaired`` expert weights (layer -> expert -> name -> tensor) replacing the source's."""
    if model is not None:
        return lambda directory: export.save_loaded(model, directory, tokenizer)
    return lambda directory: export.export_checkpoint(
        source.path, directory, source.adapter, report.kept, report.pruning_record(), tokenizer, repaired
    )


def verify_export(directory: str) -> None:
    """The export is complete: its weight files match their index, and config and report exist."""
    weights = verify_checkpoint(directory, strict=True)
    if not weights:
        raise OSError(errno.ENOENT, "the export wrote no weights", directory)
    for name in ("config.json", REPORT_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            raise OSError(errno.ENOENT, "missing from the export", os.path.join(directory, name))


def prune_in_memory(model: nn.Module, source: LayerSource, report: PruneReport) -> nn.Module:
    """Drops the unchosen experts from a loaded model, in place."""
    return export.prune_loaded_model(model, source.adapter, report.kept, report.pruning_record())


def load_pruned(source: LayerSource, report: PruneReport, exported: str | None, repaired: dict | None = None) -> nn.Module:
    """The pruned model of a checkpoint run: read back from ``exported``, or (nothing written on
    this rank) the source loaded whole, given its ``repaired`` expert weights and pruned in memory."""
    with quiet_loading():
        if exported is not None:
            return loading.load_pretrained(exported, dtype=source.dtype)
        full = loading.load_pretrained(source.path, dtype=source.dtype)
        if repaired:
            apply_repaired(full, source.adapter, repaired)
        return prune_in_memory(full, source, report)
