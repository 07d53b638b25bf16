"""`moe-fast prune --repair`: refusals before any work, then a repaired export with its table,
its report and a checkpoint stock transformers loads, for each repair."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_fast.cli import main
from helpers.brute_force import calibration_ids
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("repair, table_word", [("lstsq", "ridge"), ("merge", "merge")])
def test_cli_repair(tmp_path, capsys, repair, table_word) -> None:
    src = save_checkpoint(tiny_mixtral(11, layers=2), tmp_path / "src")
    torch.save(calibration_ids(11), tmp_path / "ids.pt")
    calib = str(tmp_path / "ids.pt")
    bad = str(tmp_path / "bad")
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", src, "--keep", "4", "--calib", calib, "--out", bad, "--repair", "bogus"])
    assert exit_info.value.code == 2
    assert main(["prune", src, "--keep", "4", "--calib", calib, "--out", bad, "--repair", repair,
                 "--criterion", "frequency", "--search", "beam", "--no-progress"]) == 2  # a criterion has no search
    assert not os.path.exists(bad)
    capsys.readouterr()
    out = str(tmp_path / "out")
    assert main(["prune", src, "--keep", "4", "--calib", calib, "--out", out, "--repair", repair,
                 "--batch-size", "4", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "loss before" in table and table_word in table
    with open(os.path.join(out, "moe_fast_report.json")) as f:
        saved = json.load(f)
    for entry in saved["layers"].values():
        assert entry["repair"]["method"] == repair
        assert entry["repair"]["loss_after"] <= entry["repair"]["loss_before"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["moe_fast"]["pruning"]["repair"] == repair
    AutoModelForCausalLM.from_pretrained(out)
    # after a statistic criterion's selection, too
    after_reap = str(tmp_path / "after_reap")
    assert main(["prune", src, "--keep", "4", "--calib", calib, "--out", after_reap, "--repair", repair,
                 "--criterion", "reap", "--batch-size", "4", "--no-progress"]) == 0
    with open(os.path.join(after_reap, "config.json")) as f:
        record = json.load(f)["moe_fast"]["pruning"]
    assert record["repair"] == repair and record["criterion"] == "reap"
