"""What `moe-fast skip` tells a user about serving, and the record version the vLLM plugin checks."""

from __future__ import annotations

import json

import torch

from moe_fast.cli import main
from moe_fast.checkpoint.config_record import SKIP_RECORD_VERSION
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral


def test_skip_warns_that_stock_vllm_serves_without_skipping_and_records_the_version(tmp_path, capsys) -> None:
    src = save_checkpoint(tiny_mixtral(), tmp_path / "src")
    torch.save(torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)), tmp_path / "ids.pt")
    out = tmp_path / "skipping"
    assert main(["skip", src, "--calib", str(tmp_path / "ids.pt"), "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "stock vLLM" in err and "without skipping" in err
    record = json.load(open(out / "config.json"))["moe_fast"]["skipping"]
    assert record["version"] == SKIP_RECORD_VERSION == 1 and record["betas"] is not None
