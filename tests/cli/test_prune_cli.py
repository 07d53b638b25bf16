"""``moe-fast prune``: the command, clear errors that write nothing, and --resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

import moe_fast
import moe_fast.pruning.strategies.reconstruction as phases_mod
import moe_fast.pruning.pipeline as prune_mod
import moe_fast.pruning.progress as progress_mod
from moe_fast.cli import main
from helpers.checkpoints import save_checkpoint, save_pruning_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoint(tmp_path):
    return save_pruning_checkpoint(tmp_path)


def _interrupt_at_first_search(monkeypatch, src: str, calib: str, keep: int, out: str) -> None:
    """A run stopped (Ctrl-C) before its first layer's search: a partial folder, nothing done."""

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(phases_mod, "run_search", boom)
    with pytest.raises(KeyboardInterrupt):
        moe_fast.prune(src, calib, keep, batch_size=4, out=out, progress=False)
    monkeypatch.undo()


def test_cli_prune_writes_checkpoint_and_table(checkpoint, tmp_path, capsys) -> None:
    src, calib = checkpoint
    out = str(tmp_path / "out")
    rc = main(["prune", src, "--keep", "6", "--calib", calib, "--out", out, "--batch-size", "4", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "layer" in text and "dropped" in text and "peak memory" in text
    report = json.load(open(os.path.join(out, "moe_fast_report.json")))
    assert sorted(report["layers"]) == ["0", "1", "2", "3"]
    assert all(len(v["kept"]) == 6 and len(v["loss"]) == 28 for v in report["layers"].values())
    assert json.load(open(os.path.join(out, "config.json")))["num_local_experts"] == 6


def test_cli_prune_with_skip_calibrates_the_pruned_model(checkpoint, tmp_path, capsys) -> None:
    src, calib = checkpoint
    out = str(tmp_path / "out")
    argv = ["prune", src, "--keep", "6", "--calib", calib, "--out", out, "--batch-size", "4", "--no-progress", "--skip"]
    assert main(argv) == 0
    record = json.load(open(os.path.join(out, "config.json")))["moe_fast"]
    assert len(record["pruning"]["kept_experts"]) == 4
    betas = record["skipping"]["betas"]
    assert len(betas) == 4 and all(0.0 <= float(b if not isinstance(b, list) else b[0]) <= 1.0 for b in betas)
    model = moe_fast.from_pretrained(out)
    assert model.config.num_local_experts == 6
    assert "skip" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("criterion", ["random", "frequency"])
def test_cli_prune_baseline_criterion(checkpoint, tmp_path, criterion) -> None:
    src, calib = checkpoint
    out = str(tmp_path / "out")
    argv = ["prune", src, "--keep", "5", "--calib", calib, "--out", out, "--criterion", criterion, "--no-progress"]
    assert main(argv) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["num_local_experts"] == 5
    record = config["moe_fast"]["pruning"]
    assert record["criterion"] == criterion
    kept = record["kept_experts"] if "kept_experts" in record else record["kept"]
    assert len(kept) == 4 and all(len(v) == 5 for v in kept.values())


def _nothing_written(tmp_path, out: str) -> None:
    assert not os.path.exists(out)
    assert not os.path.exists(out + prune_mod.PARTIAL_SUFFIX)


@pytest.mark.parametrize("keep,match", [(8, "keep must satisfy"), (9, "keep must satisfy"), (1, "keep must satisfy")])
def test_bad_keep_writes_nothing(checkpoint, tmp_path, keep, match) -> None:
    src, calib = checkpoint
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=match):
        moe_fast.prune(src, calib, keep, out=out, progress=False)
    _nothing_written(tmp_path, out)


def test_unsupported_model_writes_nothing(tmp_path, capsys) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    src = save_checkpoint(dense, tmp_path / "llama", shard=None)
    torch.save(torch.zeros(2, 4, dtype=torch.long), tmp_path / "ids.pt")
    out = str(tmp_path / "out")
    rc = main(["prune", src, "--keep", "2", "--calib", str(tmp_path / "ids.pt"), "--out", out, "--no-progress"])
    assert rc == 2
    assert "does not support model_type 'llama'" in capsys.readouterr().err
    _nothing_written(tmp_path, out)


def test_existing_nonempty_out_refused(checkpoint, tmp_path) -> None:
    src, calib = checkpoint
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        moe_fast.prune(src, calib, 6, out=str(out), progress=False)
    assert os.listdir(out) == ["keep.txt"]
    assert not os.path.exists(str(out) + prune_mod.PARTIAL_SUFFIX)


@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_resume_continues_after_interruption(checkpoint, tmp_path, monkeypatch, mode) -> None:
    src, calib = checkpoint
    clean = moe_fast.prune(src, calib, 5, mode=mode, batch_size=4, return_model=False, progress=False, out=str(tmp_path / "clean")).report
    out = str(tmp_path / "out")
    real = phases_mod.run_search
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(phases_mod, "run_search", interrupted)
    with pytest.raises(KeyboardInterrupt):
        moe_fast.prune(src, calib, 5, mode=mode, batch_size=4, out=out, return_model=False, progress=False)
    assert not os.path.exists(out)
    saved = json.load(open(os.path.join(out + prune_mod.PARTIAL_SUFFIX, "progress.json")))
    assert sorted(saved["layers"]) == ["0", "1"]

    searched = []

    def counting(*args, **kwargs):
        searched.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(phases_mod, "run_search", counting)
    _, report = moe_fast.prune(src, calib, 5, mode=mode, batch_size=4, out=out, resume=True, return_model=False, progress=False)
    assert len(searched) == 2  # only layers 2 and 3 were searched again
    assert report.kept == clean.kept
    for i in (2, 3):
        for key, v in clean.layers[i].loss.items():
            assert report.layers[i].loss[key] == pytest.approx(v, rel=1e-6)
    assert os.path.exists(os.path.join(out, "moe_fast_report.json"))
    assert not os.path.exists(out + prune_mod.PARTIAL_SUFFIX)


def test_resume_refuses_other_settings(checkpoint, tmp_path, monkeypatch) -> None:
    src, calib = checkpoint
    out = str(tmp_path / "out")

    _interrupt_at_first_search(monkeypatch, src, calib, 5, out)
    with pytest.raises(ValueError, match="other settings"):
        moe_fast.prune(src, calib, 6, batch_size=4, out=out, resume=True, progress=False)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_permission_denied_on_the_parent_is_one_line(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    src, calib = checkpoint
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root ignores the mode bits: let mkdir refuse the way the kernel would
        real_mkdir = os.mkdir

        def mkdir(path, mode=0o777, **kw):
            if os.path.dirname(os.path.abspath(os.fspath(path))) == str(parent):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_mkdir(path, mode, **kw)

        monkeypatch.setattr(os, "mkdir", mkdir)
    out = str(parent / "out")
    try:
        rc = main(["prune", src, "--keep", "6", "--calib", calib, "--out", out, "--no-progress"])
    finally:
        parent.chmod(0o755)
    assert rc == 2
    assert _one_error_line(capsys) == f"moe-fast prune: error: {out}{prune_mod.PARTIAL_SUFFIX}: Permission denied"
    assert os.listdir(parent) == []


def test_full_disk_is_one_line_and_resume_works_after(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    src, calib = checkpoint
    out = str(tmp_path / "out")
    real = safetensors.torch.save_file
    writes = []

    def disk_fills_up(tensors, path, metadata=None):  # what safetensors raises on ENOSPC, after a partial write
        writes.append(path)
        if len(writes) == 3:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_up)
    argv = ["prune", src, "--keep", "6", "--calib", calib, "--out", out, "--batch-size", "4", "--no-progress"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert line == f"moe-fast prune: error: {writes[2]}: No space left on device"
    assert not os.path.exists(out)
    progress = json.load(open(os.path.join(out + prune_mod.PARTIAL_SUFFIX, "progress.json")))
    assert sorted(progress["layers"]) == ["0", "1", "2", "3"]

    def no_search(*args, **kwargs):
        raise AssertionError("resume searched again")

    monkeypatch.setattr(safetensors.torch, "save_file", real)  # space freed
    monkeypatch.setattr(phases_mod, "run_search", no_search)
    assert main(argv + ["--resume"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["num_local_experts"] == 6
    assert not os.path.exists(out + prune_mod.PARTIAL_SUFFIX)


def test_full_disk_while_saving_progress_is_one_line(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    src, calib = checkpoint
    out = str(tmp_path / "out")

    def dump(*args, **kwargs):  # a plain file write on a full disk: OSError without a file name
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(progress_mod.json, "dump", dump)
    rc = main(["prune", src, "--keep", "6", "--calib", calib, "--out", out, "--no-progress"])
    assert rc == 2
    tmp = os.path.join(out + prune_mod.PARTIAL_SUFFIX, "progress.json.tmp")
    assert _one_error_line(capsys) == f"moe-fast prune: error: {tmp}: No space left on device"
    assert not os.path.exists(out)


def test_truncated_progress_json_is_one_line(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    src, calib = checkpoint
    out = str(tmp_path / "out")

    _interrupt_at_first_search(monkeypatch, src, calib, 6, out)
    progress = os.path.join(out + prune_mod.PARTIAL_SUFFIX, "progress.json")
    with open(progress, "r+") as f:
        f.truncate(13)
    rc = main(["prune", src, "--keep", "6", "--calib", calib, "--out", out, "--batch-size", "4", "--resume", "--no-progress"])
    assert rc == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"moe-fast prune: error: resume: {progress} is unreadable (JSONDecodeError: Expecting value")
    assert "run without --resume" in line
    assert os.path.getsize(progress) == 13 and not os.path.exists(out)


def test_prune_help_documents_every_option() -> None:
    from moe_fast.cli import build_parser

    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    undocumented = [a.option_strings or a.dest for a in prune._actions if not a.help]
    assert undocumented == []
    usage = prune.format_usage()
    assert "--calib SPEC --out DIR" in usage and "[--calib" not in usage and "[--out" not in usage
    assert "--plan" in usage
