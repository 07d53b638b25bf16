"""What the commands print: log lines that do not break progress bars, no loading bars, each table once;
and output folders made like a plain mkdir (mode from the umask)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest

from moe_fast.models import quiet_loading
from moe_fast.checkpoint.staging import staged_directory
from helpers.checkpoints import save_checkpoint, save_pruning_checkpoint
from helpers.tiny_models import tiny_mixtral

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ moe_fast\.")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_staged_directory_mode_follows_the_umask(tmp_path, umask) -> None:
    old = os.umask(umask)
    try:
        with staged_directory(tmp_path / "out") as stage:
            open(os.path.join(stage, "x"), "w").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o777 & ~umask


def test_quiet_loading_hides_the_loading_weights_bar(tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    src = save_checkpoint(tiny_mixtral(1, layers=1), tmp_path / "src", shard=None)
    capsys.readouterr()
    AutoModelForCausalLM.from_pretrained(src)
    shown = capsys.readouterr().err
    with quiet_loading():
        AutoModelForCausalLM.from_pretrained(src)
    hidden = capsys.readouterr().err
    AutoModelForCausalLM.from_pretrained(src)
    again = capsys.readouterr().err
    assert "Loading weights" in shown  # the bar this hides exists (else the check below proves nothing)
    assert "Loading weights" not in hidden
    assert "Loading weights" in again  # only inside the block


@pytest.mark.usefixtures("one_thread")
def test_prune_skip_output(tmp_path) -> None:
    """`moe-fast prune --skip` with progress bars on, as a user runs it (a fresh process)."""
    src, calib = save_pruning_checkpoint(tmp_path)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "moe_fast", "prune", src, "--keep", "6", "--calib", calib,
            "--out", str(out), "--batch-size", "4", "--skip"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    both = run.stdout + run.stderr
    assert "Loading weights" not in both
    assert len(re.findall(r"^\s*layer\s+beta_1\s+skip_1\s+calls saved", both, re.M)) == 1  # the skip table, once
    assert "layers" in run.stderr  # the progress bar was shown
    logs = list(LOG_LINE.finditer(run.stderr))
    assert logs, run.stderr[-2000:]
    for m in logs:
        line_start = run.stderr[: m.start()].rsplit("\n", 1)[-1]
        assert line_start.rsplit("\r", 1)[-1].strip() == "", repr(line_start[-200:])  # not glued to a bar
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
