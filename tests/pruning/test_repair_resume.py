"""A repaired prune killed after a layer and resumed with ``resume=True`` exports exactly what the
uninterrupted run exports (issue 24: repair with resume): the partial folder keeps each finished
layer's repaired rows beside its progress. Interruptions are simulated as in
tests/pruning/test_prune_resume_exact.py (an exception at a point of the run; the lock and the partial
folder stay as a kill leaves them)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import moe_fast
import moe_fast.pruning.pipeline as pipeline
from moe_fast.pruning.progress import PARTIAL_SUFFIX
from moe_fast.pruning.repair import ROWS_FILE
from helpers.brute_force import calibration_ids
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING_FIELDS = ("timings", "peak_memory_bytes")
KEEP, BATCH = 5, 4


class Killed(RuntimeError):
    """Stands for a kill at a point of the run."""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("repair_resume")
    model = tiny_mixtral(3, layers=4, ffn=8).to(torch.float16)
    return save_checkpoint(model, root / "src"), calibration_ids(3, n=16, length=32), model


def _run(src, ids, out, **kwargs):
    return moe_fast.prune(src, ids, KEEP, out=out, batch_size=BATCH, progress=False, return_model=False, **kwargs)


def _report(out) -> dict:
    with open(os.path.join(out, "moe_fast_report.json")) as f:
        return {k: v for k, v in json.load(f).items() if k not in TIMING_FIELDS}


def _tensors(out) -> dict[str, torch.Tensor]:
    state = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(out, name)))
    return state


def _kill_after_save(monkeypatch, layer: int) -> None:
    """Dies once layer ``layer``'s progress, states and repaired rows are saved."""
    real_save = pipeline._save_progress

    def save_then_die(ctx, partial, settings, report, stream, folder, next_layer):
        real_save(ctx, partial, settings, report, stream, folder, next_layer)
        if next_layer == layer + 1:
            raise Killed(next_layer)

    monkeypatch.setattr(pipeline, "_save_progress", save_then_die)


@pytest.mark.parametrize("repair, mode", [("lstsq", "layerwise"), ("lstsq", "progressive"), ("merge", "progressive")])
def test_killed_after_layer_1_then_resumed_equals_uninterrupted(source, tmp_path, monkeypatch, repair, mode) -> None:
    src, ids, _ = source
    want = str(tmp_path / "want")
    _, report = _run(src, ids, want, mode=mode, repair=repair)
    assert any(r.repair["loss_after"] < r.repair["loss_before"] for i, r in report.layers.items() if i <= 1)

    out = str(tmp_path / "out")
    _kill_after_save(monkeypatch, 1)
    with pytest.raises(Killed):
        _run(src, ids, out, mode=mode, repair=repair)
    partial = out + PARTIAL_SUFFIX
    assert os.path.isdir(partial) and not os.path.exists(out)
    saved = {i for i in range(4) if os.path.exists(os.path.join(partial, ROWS_FILE.format(i)))}
    assert saved == {i for i in (0, 1) if not report.layers[i].repair["reverted"]} and saved
    monkeypatch.undo()

    _run(src, ids, out, mode=mode, repair=repair, resume=True)
    assert _report(out) == _report(want)
    a, b = _tensors(out), _tensors(want)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(partial)


def test_resume_without_the_saved_rows_is_refused(source, tmp_path, monkeypatch) -> None:
    """A finished, repaired layer whose rows are gone cannot be resumed as if it had not been repaired."""
    src, ids, _ = source
    out = str(tmp_path / "out")
    _kill_after_save(monkeypatch, 1)
    with pytest.raises(Killed):
        _run(src, ids, out, repair="lstsq")
    monkeypatch.undo()
    partial = out + PARTIAL_SUFFIX
    for name in os.listdir(partial):
        if name.startswith("repaired_layer_"):
            os.unlink(os.path.join(partial, name))
    with pytest.raises(ValueError, match="was repaired but .* is missing"):
        _run(src, ids, out, repair="lstsq", resume=True)


def test_loaded_model_resumed_equals_uninterrupted(source, tmp_path, monkeypatch) -> None:
    """A loaded model: the resumed run writes the finished layers' saved rows into the fresh model."""
    _, ids, model = source
    model = model.float()
    want_model, _ = moe_fast.prune(copy.deepcopy(model), ids, KEEP, out=str(tmp_path / "want"), batch_size=BATCH,
                                   progress=False, repair="lstsq")
    out = str(tmp_path / "out")
    _kill_after_save(monkeypatch, 1)
    with pytest.raises(Killed):
        moe_fast.prune(copy.deepcopy(model), ids, KEEP, out=out, batch_size=BATCH, progress=False, repair="lstsq")
    monkeypatch.undo()
    got_model, _ = moe_fast.prune(copy.deepcopy(model), ids, KEEP, out=out, batch_size=BATCH, progress=False,
                                  repair="lstsq", resume=True)
    a, b = got_model.state_dict(), want_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _report(out) == _report(str(tmp_path / "want"))
