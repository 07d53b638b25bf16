"""The partial folder ``<out>.moe_fast_partial``: the run's lock and the layers it has finished.

Every finished layer is saved to ``progress.json`` there, with the hidden states carried past it
(``carried_states``), so that ``resume=True`` continues after an interruption with the same
settings exactly as the interrupted run would have. The folder's lock (``moe_fast.checkpoint.staging.FolderLock``) is
held from the start of a run to its end, so two runs into one ``out`` never interleave; a run that
fails keeps the folder (and its progress), a run that finishes removes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Iterator

from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.report import LayerResult, PruneReport, layer_dict
from moe_fast.checkpoint.staging import LOCK_NAME, FolderBusy, FolderLock, describe_holder, remove_stale_stages

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".moe_fast_partial"
PROGRESS_NAME = "progress.json"


def partial_folder(out: str) -> str:
    return out.rstrip("/") + PARTIAL_SUFFIX


class Progress:
    """The partial folder of one run, locked; ``folder`` None (no ``out``, or not rank 0) saves nothing."""

    def __init__(self, folder: str | None = None, lock: FolderLock | None = None) -> None:
        self.folder, self.lock = folder, lock
        self.states_next_layer = 0  # resume: the layer whose input the saved carried states are (0: none)
        self.out_not_empty = False  # resume: ``out`` already holds files (a run killed after its export?)

    @classmethod
    def claim(cls, out: str) -> "Progress":
        """Takes the lock of ``out``'s partial folder; FolderBusy (naming the holder) while another run has it."""
        folder = partial_folder(out)
        lock = FolderLock(folder)
        try:
            lock.acquire()
        except FolderBusy as err:
            raise FolderBusy(f"another prune into {out} is running ({err.holder}); wait for it to end or choose another --out") from None
        if lock.previous:
            log.info("%s: taking over from a run that ended without finishing (%s)", folder, describe_holder(lock.previous))
        for stage in remove_stale_stages(out):  # staging folders of a run killed during its export
            log.info("removed %s, the unfinished export of an interrupted run", stage)
        return cls(folder, lock)

    def start(self, settings: dict, resume: bool) -> dict[int, LayerResult]:
        """The layers already done (``resume``; otherwise the folder is emptied, its lock kept),
        then saves ``settings``, which a later resume checks against its own."""
        if self.folder is None:
            return {}
        layers = self._load(settings) if resume else self._clear()
        self.save(settings, PruneReport(layers=layers))
        return layers

    def save(self, settings: dict, report: PruneReport, states_next_layer: int = 0) -> None:
        """Replaces progress.json in one rename: an interruption leaves the old or the new one.
        ``states_next_layer``: the layer whose input the carried states saved with it are."""
        if self.folder is None:
            return
        tmp = os.path.join(self.folder, PROGRESS_NAME + ".tmp")
        layers = {str(i): layer_dict(r) for i, r in report.layers.items()}
        with naming_errors(tmp):
            with open(tmp, "w") as f:
                json.dump({"settings": settings, "layers": layers, "states_next_layer": states_next_layer}, f)
        os.replace(tmp, os.path.join(self.folder, PROGRESS_NAME))

    def release(self, finished: bool) -> None:
        """Unlocks; a finished run removes the folder, a failed one keeps its progress for resume."""
        if self.lock is not None:
            self.lock.release(remove=finished)
            self.lock = None

    def _clear(self) -> dict[int, LayerResult]:
        for name in os.listdir(self.folder):
            if name != LOCK_NAME:
                target = os.path.join(self.folder, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                else:
                    os.unlink(target)
        return {}

    def _load(self, settings: dict) -> dict[int, LayerResult]:
        path = os.path.join(self.folder, PROGRESS_NAME)
        if not os.path.exists(path):
            log.info("resume: no saved progress in %s, starting from the first layer", self.folder)
            return {}
        try:
            with open(path) as f:
                saved = json.load(f)
            layers = {int(i): LayerResult(**r) for i, r in saved["layers"].items()}
            self.states_next_layer = int(saved.get("states_next_layer", 0))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(
                f"resume: {path} is unreadable ({type(err).__name__}: {err}); run without --resume to start over"
            ) from None
        if saved.get("settings") != json.loads(json.dumps(settings)):
            raise ValueError(
                f"resume: the saved progress in {self.folder} was made with other settings or calibration tokens; "
                "run without --resume to start over"
            )
        log.info("resume: %d layers already done", len(layers))
        return layers


@contextlib.contextmanager
def claimed(out: str | None, ctx: Dist, resume: bool = False) -> Iterator[Progress]:
    """The run's Progress (rank 0 with ``out``), released when the block ends: the folder removed
    if the block finished and the progress kept if it raised. Refuses a non-empty ``out`` before
    taking the lock and again after (a run that held the lock may have just finished there);
    with ``resume`` a non-empty ``out`` is left to the caller (``out_not_empty``), which accepts
    it only as this run's complete, verified output."""
    with ctx.guard():  # rank 0 alone claims; a refusal reaches every rank
        progress = _claim(out, resume) if ctx.rank == 0 else Progress()
    finished = False
    try:
        yield progress
        finished = True
    finally:
        progress.release(finished)


def _claim(out: str | None, resume: bool = False) -> Progress:
    if not resume:
        check_out(out)
    if out is None:
        return Progress()
    progress = Progress.claim(out)
    try:
        if resume:
            progress.out_not_empty = out_has_files(out)
        else:
            check_out(out)
    except BaseException:
        progress.release(finished=False)
        raise
    return progress


def out_has_files(out: str) -> bool:
    """``out`` exists with something in it (a file in its place is refused here)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"output {out} exists and is not a directory")
    return os.path.isdir(out) and bool(os.listdir(out))


def check_out(out: str | None) -> None:
    if out is not None and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"output directory {out} exists and is not empty")


@contextlib.contextmanager
def naming_errors(path: str) -> Iterator[None]:
    """OSErrors (full disk, permissions) raised without a file name get ``path`` as theirs."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, path) from err
        raise
