"""A killed prune resumed with ``resume=True`` gives exactly the uninterrupted run's checkpoint
and report (issue 25): kills at layer boundaries and inside the export, float16 and bfloat16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import moe_fast
import moe_fast.pruning.pipeline as pipeline
from moe_fast.cli import main
from moe_fast.pruning.progress import PARTIAL_SUFFIX
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING_FIELDS = ("timings", "peak_memory_bytes")


class Killed(RuntimeError):
    """Stands for SIGKILL at a point of the run (the lock and progress stay as a kill leaves them)."""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{dtype name: (checkpoint, ids file)}: a 4-layer tiny Mixtral stored in that dtype."""
    root = tmp_path_factory.mktemp("resume_sources")
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(3))
    torch.save(ids, root / "ids.pt")
    out = {}
    for name in ("float16", "bfloat16"):
        model = tiny_mixtral(5, layers=4, experts=8, hidden=64, ffn=96).to(getattr(torch, name))
        out[name] = (save_checkpoint(model, root / name), str(root / "ids.pt"))
    return out


def _run(src, ids, out, **kwargs):
    args = dict(out=out, batch_size=2, progress=False, return_model=False, search="greedy")
    return moe_fast.prune(src, ids, 5, **(args | kwargs))


def _report(out) -> dict:
    with open(os.path.join(out, "moe_fast_report.json")) as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if k not in TIMING_FIELDS}


def _tensors(out) -> dict[str, torch.Tensor]:
    state = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(out, name)))
    return state


def _assert_same_output(got, want) -> None:
    assert _report(got) == _report(want)
    a, b = _tensors(got), _tensors(want)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(got + PARTIAL_SUFFIX)
    parent, name = os.path.split(got)
    assert [e for e in os.listdir(parent) if e.startswith(f".{name}.")] == []  # no staging folder left


@pytest.fixture(scope="module")
def uninterrupted(sources, tmp_path_factory):
    """{(dtype, mode): out folder of the run nobody killed}."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cache = {}

    def get(dtype: str, mode: str) -> str:
        if (dtype, mode) not in cache:
            out = str(root / f"{dtype}-{mode}")
            _run(*sources[dtype], out, mode=mode)
            cache[dtype, mode] = out
        return cache[dtype, mode]

    return get


@pytest.mark.parametrize("dtype, mode, where, layer", [
    ("float16", "layerwise", "after_log", 1), ("bfloat16", "layerwise", "after_log", 1),
    ("float16", "progressive", "after_log", 2), ("bfloat16", "progressive", "after_save", 1),
    ("float16", "layerwise", "before_progress", 2), ("bfloat16", "layerwise", "before_progress", 0),
])
def test_kill_at_a_layer_boundary_then_resume_is_exact(sources, uninterrupted, tmp_path, monkeypatch, dtype, mode, where, layer):
    src, ids = sources[dtype]
    out = str(tmp_path / "out")
    if where == "after_log":  # SIGKILL right after the log line "layer N:" (the reproduction)
        real_log = pipeline._log_layer

        def log_then_die(index, result, bar):
            real_log(index, result, bar)
            if index == layer:
                raise Killed(index)

        monkeypatch.setattr(pipeline, "_log_layer", log_then_die)
    elif where == "after_save":  # after layer N's progress and states are saved
        real_save = pipeline._save_progress

        def save_then_die(ctx, partial, settings, report, stream, folder, next_layer):
            real_save(ctx, partial, settings, report, stream, folder, next_layer)
            if next_layer == layer + 1:
                raise Killed(next_layer)

        monkeypatch.setattr(pipeline, "_save_progress", save_then_die)
    else:  # layer N's states written, its progress.json not yet
        real_states = pipeline.save_states

        def states_then_die(folder, next_layer, rank, stream):
            real_states(folder, next_layer, rank, stream)
            if next_layer == layer + 1:
                raise Killed(next_layer)

        monkeypatch.setattr(pipeline, "save_states", states_then_die)
    with pytest.raises(Killed):
        _run(src, ids, out, mode=mode)
    assert os.path.exists(out + PARTIAL_SUFFIX) and not os.path.exists(out)
    monkeypatch.undo()
    _run(src, ids, out, mode=mode, resume=True)
    _assert_same_output(out, uninterrupted(dtype, mode))


# A run killed (os._exit: no cleanup at all) inside the export: after the weights are written
# into the staging folder, or after the final rename before the partial folder is removed.
KILLER = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    import moe_fast
    import moe_fast.pruning.output as output_mod
    import moe_fast.pruning.progress as progress_mod

    src, ids, out, dtype_point = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    if dtype_point == "staged":
        real = output_mod.finish_report
        def die(*args, **kwargs):
            os._exit(9)
        output_mod.finish_report = die
    else:
        def die(self, finished):
            os._exit(9)
        progress_mod.Progress.release = die
    moe_fast.prune(src, ids, 5, out=out, batch_size=2, progress=False, return_model=False, search="greedy")
    os._exit(0)
    """
)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_kill_inside_the_export_then_resume_cleans_up_and_is_exact(sources, uninterrupted, tmp_path, dtype, capsys):
    src, ids = sources[dtype]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    # 1. killed with the weights in the staging folder: the folder is left, out is not there
    out = str(tmp_path / "staged")
    assert subprocess.run([sys.executable, "-c", KILLER, src, ids, out, "staged"], env=env).returncode == 9
    assert not os.path.exists(out) and [e for e in os.listdir(tmp_path) if e.startswith(".staged.")]
    _run(src, ids, out, resume=True)
    _assert_same_output(out, uninterrupted(dtype, "layerwise"))
    # 2. killed after the final rename: out is complete, the partial folder is still there
    out = str(tmp_path / "renamed")
    assert subprocess.run([sys.executable, "-c", KILLER, src, ids, out, "renamed"], env=env).returncode == 9
    assert os.path.isdir(out) and os.path.isdir(out + PARTIAL_SUFFIX)
    rc = main(["prune", src, "--keep", "5", "--calib", ids, "--out", out, "--batch-size", "2", "--search", "greedy",
               "--no-progress", "--resume"])
    captured = capsys.readouterr()
    assert rc == 0 and f"pruned checkpoint: {out}" in captured.out
    _assert_same_output(out, uninterrupted(dtype, "layerwise"))


def test_resume_into_a_complete_output_of_other_settings_is_refused(sources, uninterrupted, tmp_path, capsys):
    src, ids = sources["float16"]
    done = uninterrupted("float16", "layerwise")
    before = _report(done)
    rc = main(["prune", src, "--keep", "6", "--calib", ids, "--out", done, "--batch-size", "2", "--no-progress", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "other settings" in err[0]
    assert _report(done) == before and not os.path.exists(done + PARTIAL_SUFFIX)
