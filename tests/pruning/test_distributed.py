"""Data-parallel calibration on torch.distributed (Gloo, 2 CPU processes).

The selections of 2 ranks sharing the calibration batches must equal one process's selections
on the same tokens, for both modes and both objectives, for beam search and for the statistic
criteria, and with a repair (its statistics summed over ranks); a rank with bad input
must stop the whole job with its error instead of leaving the other rank waiting.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import moe_fast
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral

BATCH = 4
# (mode, objective, search, lazy): lazy None is the default (rank-bounded exhaustive, lazy beam/greedy).
CASES = [("layerwise", "paper", "exhaustive", None), ("progressive", "paper", "exhaustive", None),
         ("layerwise", "mse", "exhaustive", None), ("progressive", "mse", "exhaustive", None),
         ("layerwise", "paper", "beam", None), ("progressive", "paper", "greedy", True),
         ("layerwise", "paper", "exhaustive", True), ("progressive", "mse", "exhaustive", True)]


CRITERIA = ("frequency", "reap", "ean")  # statistic criteria: per-expert sums over both ranks' batches
REPAIRS = [("layerwise", "lstsq"), ("progressive", "lstsq"), ("progressive", "merge")]  # statistics summed over ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ids(n: int = 14, length: int = 16) -> torch.Tensor:  # 4 batches, the last one partial
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(7))


def _worker(rank: int, world: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        for mode, objective, search, lazy in CASES:
            _, report = moe_fast.prune(tiny_mixtral(21, layers=3), _ids(), 4, mode=mode, objective=objective,
                                       search=search, beam_width=2, batch_size=BATCH, progress=False, lazy=lazy)
            assert report.world_size == world
            assert report.settings["lazy"] is (search != "exhaustive" if lazy is None else lazy)
            out[f"{mode}/{objective}/{search}/{lazy}"] = {
                str(i): [r.dropped, r.loss, r.expert_outputs_per_token] for i, r in report.layers.items()}
        for criterion in CRITERIA:
            _, report = moe_fast.prune(tiny_mixtral(21, layers=3), _ids(), 4, criterion=criterion, batch_size=BATCH,
                                       progress=False, return_model=False)
            out[criterion] = {str(i): [r.kept, r.criterion_scores] for i, r in report.layers.items()}
        for mode, repair in REPAIRS:
            model, report = moe_fast.prune(tiny_mixtral(21, layers=3), _ids(), 4, mode=mode, repair=repair,
                                           batch_size=BATCH, progress=False)
            out[f"{mode}/{repair}"] = {"layers": {str(i): [r.kept, r.repair] for i, r in report.layers.items()},
                                       "down_proj": [float(layer.mlp.experts.down_proj.double().sum()) for layer in model.model.layers]}
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_select_what_one_process_selects(tmp_path, one_thread) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank ends with the same selection (and losses)
    model = tiny_mixtral(21, layers=3)
    for mode, objective, search, lazy in CASES:
        # one process, the rank-bounded search: the same selections and (for the sets it scored) losses
        _, ref = moe_fast.prune(copy.deepcopy(model), _ids(), 4, mode=mode, objective=objective, search=search,
                                beam_width=2, batch_size=BATCH, progress=False, lazy=False)
        got = ranks[0][f"{mode}/{objective}/{search}/{lazy}"]
        for i, r in ref.layers.items():
            assert got[str(i)][0] == r.dropped, (mode, objective, search, lazy, i)
            # lazy: its outputs ran in other batches (float32 rounding), and exhaustive keeps only the sets scored exactly
            rel = 1e-6 if lazy or (lazy is None and search != "exhaustive") else 1e-9
            for key, value in got[str(i)][1].items():
                assert value == pytest.approx(r.loss[key], rel=rel, abs=1e-12), (mode, objective, search, lazy, i, key)
        if lazy or (lazy is None and search != "exhaustive"):
            # each token is extended as far as in one process: the counts over both ranks agree
            _, one = moe_fast.prune(copy.deepcopy(model), _ids(), 4, mode=mode, objective=objective, search=search,
                                    beam_width=2, batch_size=BATCH, progress=False, lazy=True)
            for i, r in one.layers.items():
                assert got[str(i)][2] == pytest.approx(r.expert_outputs_per_token, abs=1e-4), (mode, objective, search, i)
    for criterion in CRITERIA:
        one = moe_fast.prune(copy.deepcopy(model), _ids(), 4, criterion=criterion, batch_size=BATCH, progress=False,
                             return_model=False).report
        for i, r in one.layers.items():
            kept, scores = ranks[0][criterion][str(i)]
            assert kept == r.kept, (criterion, i)
            assert scores == pytest.approx(r.criterion_scores, rel=1e-9, abs=1e-12), (criterion, i)
    for mode, repair in REPAIRS:
        model_one, one = moe_fast.prune(copy.deepcopy(model), _ids(), 4, mode=mode, repair=repair, batch_size=BATCH,
                                        progress=False)
        got = ranks[0][f"{mode}/{repair}"]
        for i, r in one.layers.items():
            kept, entry = got["layers"][str(i)]
            assert kept == r.kept, (mode, repair, i)
            assert entry["reverted"] == r.repair["reverted"] and entry.get("ridge_scale") == r.repair.get("ridge_scale")
            assert entry.get("strength") == r.repair.get("strength"), (mode, repair, i)
            for key in ("loss_before", "loss_after"):
                assert entry[key] == pytest.approx(r.repair[key], rel=1e-6), (mode, repair, i, key)
        assert any(not r.repair["reverted"] for r in one.layers.values()), (mode, repair)  # a repair that did something
        sums = [float(layer.mlp.experts.down_proj.double().sum()) for layer in model_one.model.layers]
        assert got["down_proj"] == pytest.approx(sums, rel=1e-5), (mode, repair)


def _torchrun(args: list[str], tmp_path, timeout: float = 120) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(moe_fast.__file__)))  # the package under test
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "moe_fast.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


# Loaded at start-up by every rank (sitecustomize): rank 1 fails inside its first layer's collect,
# as a rank whose own batches break something mid-run would.
FAILING_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    import moe_fast.pruning.layer_phases as phases

    def broken(self, *args, **kwargs):
        raise IndexError("index out of range in self (injected on rank 1)")

    phases.LayerPruner.collect = broken
"""


def test_torchrun_cli_and_failing_rank(tmp_path, monkeypatch) -> None:
    model = tiny_mixtral(22, layers=2)
    src = save_checkpoint(model, tmp_path / "src")
    good = _ids(16)
    torch.save(good, tmp_path / "good.pt")
    proc = _torchrun(["prune", src, "--keep", "5", "--calib", str(tmp_path / "good.pt"), "--out", str(tmp_path / "out"),
                      "--batch-size", str(BATCH), "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "moe_fast_report.json").read_text())
    assert report["world_size"] == 2
    _, ref = moe_fast.prune(copy.deepcopy(model), good, 5, batch_size=BATCH, progress=False)
    assert {int(i): r["kept"] for i, r in report["layers"].items()} == ref.kept

    bad = good.clone()
    bad[5, 3] = 10_000  # in batch 1, which rank 1 holds: every rank refuses it before any forward
    torch.save(bad, tmp_path / "bad.pt")
    proc = _torchrun(["prune", src, "--keep", "5", "--calib", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "out1"),
                      "--batch-size", str(BATCH), "--no-progress"], tmp_path, timeout=90)
    assert proc.returncode != 0 and "token id 10000 (sample 5, position 3) is outside" in proc.stderr, proc.stderr[-3000:]
    assert not [e for e in os.listdir(tmp_path) if e.startswith(("out1", ".out1"))]  # refused before the lock

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_RANK_1)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    proc = _torchrun(["prune", src, "--keep", "5", "--calib", str(tmp_path / "good.pt"), "--out", str(tmp_path / "out2"),
                      "--batch-size", str(BATCH), "--no-progress"], tmp_path, timeout=90)  # a hang would time out
    assert proc.returncode != 0
    assert "rank 1: IndexError" in proc.stderr, proc.stderr[-3000:]
    assert "another rank failed" in proc.stderr  # rank 0 stopped with rank 1's error
    assert not (tmp_path / "out2" / "moe_fast_report.json").exists()


# Every rank stops after layer 1's progress is saved, as a run killed there would (issue 25).
STOP_AFTER_LAYER_1 = """
import moe_fast.pruning.pipeline as pipeline

real = pipeline._save_progress

def save_then_stop(ctx, partial, settings, report, stream, folder, next_layer):
    real(ctx, partial, settings, report, stream, folder, next_layer)
    if next_layer == 2:
        raise ValueError("stopped after layer 1 (injected)")

pipeline._save_progress = save_then_stop
"""


def test_torchrun_resume_restores_every_rank_s_states_exactly(tmp_path, monkeypatch) -> None:
    src = save_checkpoint(tiny_mixtral(23, layers=4).half(), tmp_path / "src")
    torch.save(_ids(16), tmp_path / "ids.pt")
    args = ["prune", src, "--keep", "5", "--calib", str(tmp_path / "ids.pt"), "--batch-size", str(BATCH),
            "--search", "greedy", "--no-progress"]
    proc = _torchrun(args + ["--out", str(tmp_path / "full")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STOP_AFTER_LAYER_1)
    with monkeypatch.context() as m:
        m.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
        proc = _torchrun(args + ["--out", str(tmp_path / "cut")], tmp_path)
    assert proc.returncode != 0 and "stopped after layer 1" in proc.stderr, proc.stderr[-3000:]
    partial = tmp_path / "cut.moe_fast_partial"
    assert sorted(p.name for p in partial.glob("states-*")) == ["states-2.rank0.pt", "states-2.rank1.pt"]
    proc = _torchrun(args + ["--out", str(tmp_path / "cut"), "--resume"], tmp_path)
    assert proc.returncode == 0 and "replaying" not in proc.stderr, proc.stderr[-3000:]

    def report(name: str) -> dict:
        data = json.loads((tmp_path / name / "moe_fast_report.json").read_text())
        return {k: v for k, v in data.items() if k not in ("timings", "peak_memory_bytes")}

    assert report("cut") == report("full") and not partial.exists()
