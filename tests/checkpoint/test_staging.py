"""staged_directory: outputs appear whole or not at all, and nothing the user had is lost."""

from __future__ import annotations

import os

import pytest

from moe_fast.checkpoint.staging import staged_directory


def test_success_moves_the_directory_in_whole(tmp_path) -> None:
    out = tmp_path / "a" / "out"
    with staged_directory(out) as stage:
        assert not out.exists()  # nothing visible while writing
        (open(os.path.join(stage, "f.txt"), "w")).write("x")
    assert (out / "f.txt").read_text() == "x"
    assert sorted(os.listdir(tmp_path / "a")) == ["out"]  # no staging left behind


def test_error_leaves_nothing_and_keeps_the_old_directory(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with staged_directory(out) as stage:
            open(os.path.join(stage, "partial"), "w").write("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == []


def test_non_empty_target_is_kept_unless_replace(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OSError):
        with staged_directory(out):
            pass
    assert (out / "mine.txt").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["out"]
    with staged_directory(out, replace=True) as stage:
        open(os.path.join(stage, "new.txt"), "w").write("y")
    assert os.listdir(out) == ["new.txt"]
