"""Calibration loading: file formats, block sampling, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from moe_fast.data.calibration import load_calibration, sample_blocks
from helpers.tiny_models import tiny_tokenizer


def _words(n: int, start: int = 0) -> str:
    return " ".join(f"w{(start + i) % 100}" for i in range(n))


def test_txt_blocks_are_consecutive_tokens(tmp_path) -> None:
    tok = tiny_tokenizer()
    path = tmp_path / "c.txt"
    path.write_text(_words(200))
    ids = load_calibration(str(path), tok, n_samples=5, seq_len=16, seed=1)
    assert ids.shape == (5, 16) and ids.dtype == torch.long
    full = torch.tensor([i % 100 for i in range(200)])
    blocks = full[: 12 * 16].view(12, 16)
    for row in ids:  # every sample is one of the 16-token blocks of the concatenated text
        assert any(torch.equal(row, b) for b in blocks)
    assert torch.equal(ids, load_calibration(str(path), tok, 5, 16, seed=1))  # seeded
    assert not torch.equal(ids, load_calibration(str(path), tok, 5, 16, seed=2))


def test_jsonl_and_json_records(tmp_path) -> None:
    tok = tiny_tokenizer()
    records = [{"text": _words(30, 0), "url": "a"}, {"text": _words(30, 50)}]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    js = tmp_path / "c.json"
    js.write_text(json.dumps(records))
    a = load_calibration(str(jl), tok, n_samples=6, seq_len=10, seed=0)
    b = load_calibration(str(js), tok, n_samples=6, seq_len=10, seed=0)
    assert torch.equal(a, b)
    concat = torch.tensor([i % 100 for i in range(30)] + [(50 + i) % 100 for i in range(30)])
    assert torch.equal(torch.sort(a.reshape(-1)).values, torch.sort(concat).values)  # all 6 blocks of 60 tokens
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        load_calibration(str(bad), tok, 1, 1)


def test_pt_ids_used_as_is(tmp_path) -> None:
    ids = torch.randint(0, 100, (4, 12))
    path = tmp_path / "ids.pt"
    torch.save(ids, path)
    assert torch.equal(load_calibration(str(path), None, None, None), ids)  # no tokenizer needed
    assert torch.equal(load_calibration(str(path), None, 2, 8), ids[:2, :8])
    with pytest.raises(ValueError, match="4 samples x 12 tokens"):
        load_calibration(str(path), None, 5, 12)


def test_too_little_text_names_both_numbers(tmp_path) -> None:
    path = tmp_path / "short.txt"
    path.write_text(_words(50))
    with pytest.raises(ValueError, match=r"50 tokens.*4 samples x 16 tokens = 64"):
        load_calibration(str(path), tiny_tokenizer(), 4, 16)


def test_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_calibration(str(tmp_path / "missing.txt"), tiny_tokenizer(), 1, 1)
    path = tmp_path / "c.txt"
    path.write_text(_words(10))
    with pytest.raises(ValueError, match="tokenizer"):
        load_calibration(str(path), None, 1, 1)
    with pytest.raises(ValueError, match="no-such-corpus-xyz"):
        load_calibration("builtin:no-such-corpus-xyz", tiny_tokenizer(), 1, 1)


def test_sample_blocks_without_replacement() -> None:
    out = sample_blocks(list(range(40)), 4, 10, seed=3)
    assert sorted(out[:, 0].tolist()) == [0, 10, 20, 30]
