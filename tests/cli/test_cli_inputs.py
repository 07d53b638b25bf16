"""What the commands accept: corrupt checkpoints (one line, exit 2, nothing written), built-in names, --help."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from moe_fast.checkpoint.verify import CheckpointError, read_header, verify_checkpoint
from moe_fast.cli import build_parser, main
from moe_fast.data.builtin import BUILTIN_CORPORA
from moe_fast.models import BUILTIN_MODELS
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _truncate(path: str) -> str:
    os.truncate(path, os.path.getsize(path) // 2)
    return "truncated"


def _garbage_header(path: str) -> str:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json at all")
    return "corrupt safetensors header"


def _huge_header_length(path: str) -> str:
    with open(path, "r+b") as f:
        f.write((2**40).to_bytes(8, "little"))
    return "truncated or not a safetensors file"


@pytest.fixture
def corrupt_inputs(tmp_path):
    src = save_checkpoint(tiny_mixtral(3, layers=2), tmp_path / "src", tokenizer=tiny_tokenizer(), shard=None)
    ids = torch.randint(0, 127, (4, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(f"w{i % 127}" for i in range(600)))
    return src, str(tmp_path / "ids.pt"), str(text)


def _argv(command: str, src: str, calib: str, text: str, out: str) -> list[str]:
    if command == "prune":
        return ["prune", src, "--keep", "4", "--calib", calib, "--out", out, "--no-progress"]
    if command == "skip":
        return ["skip", src, "--calib", calib, "--out", out, "--no-progress"]
    return ["eval", src, "--data", text, "--json", out, "--prompts", "0", "--seq-len", "32"]


@pytest.mark.parametrize("damage", [_truncate, _garbage_header, _huge_header_length])
@pytest.mark.parametrize("command", ["prune", "skip", "eval"])
def test_corrupt_weights_one_line_exit_2_nothing_written(corrupt_inputs, tmp_path, capsys, command, damage) -> None:
    src, calib, text = corrupt_inputs
    weights = os.path.join(src, "model.safetensors")
    problem = damage(weights)
    before = sorted(os.listdir(tmp_path))
    out = str(tmp_path / "out")
    rc = main(_argv(command, src, calib, text, out))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"moe-fast {command}: error: {weights}: {problem}"), err[0]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written: no output, partial folder or stage


def test_missing_and_short_shards_of_a_sharded_checkpoint(tmp_path, capsys) -> None:
    src = save_checkpoint(tiny_mixtral(3, layers=2), tmp_path / "src")  # sharded
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    verify_checkpoint(src)  # intact
    os.remove(os.path.join(src, shards[1]))
    with pytest.raises(CheckpointError, match=re.escape(f"{os.path.join(src, shards[1])}: file missing")):
        verify_checkpoint(src)
    torch.save(torch.zeros(2, 8, dtype=torch.long), tmp_path / "ids.pt")
    rc = main(["prune", src, "--keep", "4", "--calib", str(tmp_path / "ids.pt"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "file missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_header_reader_against_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    path = str(tmp_path / "x.safetensors")
    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int64)}
    save_file(tensors, path)
    header = read_header(path)
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {"a": ("BF16", [3, 5]), "b": ("I64", [7])}
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_header(path)


def _help(command: str | None) -> str:
    parser = build_parser()
    if command is not None:
        parser = parser._subparsers._group_actions[0].choices[command]
    text = parser.format_help()
    return re.sub(r"-\s+", "-", " ".join(text.split()))  # undo line wrapping (also at hyphens)


@pytest.mark.parametrize("command", [None, "prune", "skip", "eval"])
def test_help_lists_builtin_models_and_corpora(command) -> None:
    text = _help(command)
    for name in BUILTIN_MODELS:
        assert f"builtin:{name}" in text
    for name in BUILTIN_CORPORA:
        assert f"builtin:{name}" in text


def test_prune_and_skip_accept_builtin_model_names(tmp_path, capsys) -> None:
    """With text calibration (the tokenizer is saved by the export), generation_config.json is still copied."""
    name = next(iter(BUILTIN_MODELS))
    spec, source = f"builtin:{name}", BUILTIN_MODELS[name]
    config = json.load(open(os.path.join(source, "config.json")))
    experts = config.get("num_local_experts") or config.get("num_experts")
    top_k = config["num_experts_per_tok"]
    keep = max(top_k, experts - 1)
    out = str(tmp_path / "pruned")
    argv = ["prune", spec, "--keep", str(keep), "--calib", "builtin:python-prose", "--n-samples", "2", "--seq-len", "32",
            "--out", out, "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.load(open(os.path.join(out, "config.json")))["moe_fast"]["pruning"]["kept_experts"]
    if os.path.exists(os.path.join(source, "generation_config.json")):
        assert json.load(open(os.path.join(out, "generation_config.json"))) == json.load(
            open(os.path.join(source, "generation_config.json"))
        )
    assert main(["prune", spec, "--keep", str(keep), "--plan"]) == 0
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    assert main(["skip", spec, "--calib", str(tmp_path / "ids.pt"), "--out", str(tmp_path / "skipping"), "--no-progress"]) == 0
    assert "skipping" in json.load(open(tmp_path / "skipping" / "config.json"))["moe_fast"]
