"""Two prunes into one --out: the partial folder's lock, the export check, and what is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import moe_fast
import moe_fast.pruning.pipeline as prune_mod
from moe_fast.checkpoint.verify import CheckpointError, verify_checkpoint
from moe_fast.cli import main
from moe_fast.checkpoint.staging import LOCK_NAME, FolderBusy, FolderLock
from helpers.checkpoints import save_pruning_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# A racer: one process that runs `moe-fast prune` once per round when the test says go. Each
# layer's search sleeps, so a run lasts well over a second and the two racers overlap.
RACER = textwrap.dedent(
    """
    import contextlib, io, json, os, sys, time
    import torch
    torch.set_num_threads(1)
    import moe_fast.pruning.strategies.reconstruction as phases_mod
    from moe_fast.cli import main

    real = phases_mod.run_search
    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)
    phases_mod.run_search = slow

    src, calib, work, rounds, me = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    open(os.path.join(work, f"ready-{me}"), "w").close()
    for r in range(rounds):
        go = os.path.join(work, f"go-{r}")
        while not os.path.exists(go):
            time.sleep(0.01)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["prune", src, "--keep", "6", "--calib", calib, "--out", os.path.join(work, f"out-{r}"),
                       "--batch-size", "4", "--no-progress"])
        with open(os.path.join(work, f"result-{r}-{me}.json"), "w") as f:
            json.dump({"rc": rc, "err": err.getvalue(), "pid": os.getpid()}, f)
    """
)


@pytest.fixture
def checkpoint(tmp_path):
    return save_pruning_checkpoint(tmp_path)


def _wait_for(path: str, procs, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while not os.path.exists(path):
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"racer exited with {p.returncode}: {p.stderr.read().decode()[-2000:]}")
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {path}"
        time.sleep(0.02)


def test_two_concurrent_prunes_into_one_out(checkpoint, tmp_path) -> None:
    src, calib = checkpoint
    work = tmp_path / "work"
    work.mkdir()
    rounds = 3
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    procs = [
        subprocess.Popen([sys.executable, str(script), src, calib, str(work), str(rounds), name], stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    try:
        for name in ("a", "b"):
            _wait_for(str(work / f"ready-{name}"), procs)
        for r in range(rounds):
            (work / f"go-{r}").touch()
            results = {}
            for name in ("a", "b"):
                _wait_for(str(work / f"result-{r}-{name}.json"), procs)
                results[name] = json.loads((work / f"result-{r}-{name}.json").read_text())
            won = [n for n, res in results.items() if res["rc"] == 0]
            assert len(won) == 1, results
            winner, loser = results[won[0]], results["b" if won[0] == "a" else "a"]
            assert loser["rc"] == 2
            lines = loser["err"].strip().splitlines()
            assert len(lines) == 1, loser["err"]
            busy = "another prune into" in lines[0] and f"pid {winner['pid']}" in lines[0]
            assert busy or "exists and is not empty" in lines[0], lines[0]
            out = str(work / f"out-{r}")
            verify_checkpoint(out, strict=True)
            model = moe_fast.from_pretrained(out)
            assert model.config.num_local_experts == 6
            left = sorted(n for n in os.listdir(work) if n.startswith("out-") or n.startswith(".out-"))
            assert left == [f"out-{i}" for i in range(r + 1)], left  # no partial folder, lock or stage left
    finally:
        for p in procs:
            p.wait(timeout=120)
    assert all(p.returncode == 0 for p in procs)


def test_live_lock_refuses_and_names_the_holder(checkpoint, tmp_path, capsys) -> None:
    src, calib = checkpoint
    out = str(tmp_path / "out")
    partial = out + prune_mod.PARTIAL_SUFFIX
    holder = FolderLock(partial).acquire()  # another open file: flock conflicts even in one process
    try:
        rc = main(["prune", src, "--keep", "6", "--calib", calib, "--out", out, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1
        assert "another prune into" in err[0] and f"pid {os.getpid()}" in err[0], err
        assert not os.path.exists(out)
        assert os.listdir(partial) == [LOCK_NAME]  # the holder's folder untouched
        with pytest.raises(FolderBusy):
            moe_fast.prune(src, calib, 6, out=out, progress=False)
    finally:
        holder.release()
    assert not os.path.exists(partial)


def test_lock_left_by_a_killed_run_is_taken_over(checkpoint, tmp_path) -> None:
    src, calib = checkpoint
    out = str(tmp_path / "out")
    partial = out + prune_mod.PARTIAL_SUFFIX
    # A run killed while holding the lock: its lock file (same protocol as FolderLock) stays behind.
    code = textwrap.dedent(
        f"""
        import fcntl, json, os, socket
        os.makedirs({partial!r})
        fd = os.open(os.path.join({partial!r}, {LOCK_NAME!r}), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({{"pid": os.getpid(), "host": socket.gethostname(), "started": "x"}}).encode())
        os._exit(9)
        """
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert os.path.exists(os.path.join(partial, LOCK_NAME))  # a dead run's lock file
    _, report = moe_fast.prune(src, calib, 6, out=out, batch_size=4, progress=False, return_model=False)
    assert len(report.layers) == 4
    verify_checkpoint(out, strict=True)
    assert not os.path.exists(partial)


def test_incomplete_export_is_never_moved(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    import moe_fast.pruning.export as export_mod

    src, calib = checkpoint
    out = str(tmp_path / "out")
    real = export_mod._save_shard

    def loses_a_shard(save_file, tensors, path):
        if not path.endswith("model-00002-of-00005.safetensors"):
            real(save_file, tensors, path)

    monkeypatch.setattr(export_mod, "_save_shard", loses_a_shard)
    with pytest.raises(CheckpointError, match="model-00002-of-00005.safetensors: file missing"):
        moe_fast.prune(src, calib, 6, out=out, batch_size=4, progress=False, return_model=False)
    assert not os.path.exists(out)
    rc = main(["prune", src, "--keep", "6", "--calib", calib, "--out", out, "--batch-size", "4", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "pruned checkpoint" not in captured.out
    assert "file missing" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not os.path.exists(out)

    def truncates_a_shard(save_file, tensors, path):
        real(save_file, tensors, path)
        if path.endswith("model-00003-of-00005.safetensors"):
            os.truncate(path, os.path.getsize(path) - 4)

    monkeypatch.setattr(export_mod, "_save_shard", truncates_a_shard)
    with pytest.raises(CheckpointError, match="model-00003-of-00005.safetensors: truncated"):
        moe_fast.prune(src, calib, 6, out=out, batch_size=4, progress=False, return_model=False, resume=True)
    assert not os.path.exists(out)
