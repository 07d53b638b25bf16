"""Streaming from a checkpoint: peak memory does not grow with the number of layers, for the
reconstruction search and for a statistic criterion (REAP) alike, and the criterion needs no more
than the search."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral

FFN = 5376

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    import moe_fast
    _, report = moe_fast.prune(sys.argv[1], torch.load(sys.argv[2]), 6, batch_size=4, return_model=False,
                               out=sys.argv[3], progress=False, criterion=sys.argv[4])
    print(json.dumps({"peak": report.peak_memory_bytes, "layers": len(report.layers)}))
    """
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{layers: checkpoint} of a Mixtral-shaped model whose experts take 66 MiB per layer."""
    root = tmp_path_factory.mktemp("memory")
    torch.save(torch.randint(0, 128, (8, 16)), root / "ids.pt")
    out = {}
    for layers in (2, 6):
        model = tiny_mixtral(13, layers=layers, hidden=128, ffn=FFN)
        out[layers] = save_checkpoint(model, root / f"src{layers}", shard="80MB")
        del model
    return root, out, {}


def _peak(checkpoints, layers: int, criterion: str) -> int:
    """Peak RSS of one run in a fresh process (measured once per module)."""
    root, sources, measured = checkpoints
    if (layers, criterion) in measured:
        return measured[layers, criterion]
    out = root / f"out{layers}-{criterion}"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, sources[layers], str(root / "ids.pt"), str(out), criterion],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layers"] == layers
    measured[layers, criterion] = result["peak"]
    return result["peak"]


@pytest.mark.parametrize("criterion", ["reconstruction", "reap"])
def test_peak_memory_flat_in_depth(checkpoints, criterion) -> None:
    layer_bytes = 8 * 3 * 128 * FFN * 4
    shallow, deep = _peak(checkpoints, 2, criterion), _peak(checkpoints, 6, criterion)
    # Holding the model would add 4 layers (264 MiB); streaming adds well under one (allocator
    # noise is some tens of MiB).
    print(f"{criterion} peak RSS: 2 layers {shallow / 2**20:.0f} MiB, 6 layers {deep / 2**20:.0f} MiB")
    assert deep - shallow < layer_bytes, (shallow, deep)


def test_a_criterion_needs_no_more_memory_than_the_search(checkpoints) -> None:
    search, reap = _peak(checkpoints, 6, "reconstruction"), _peak(checkpoints, 6, "reap")
    print(f"6 layers peak RSS: reconstruction {search / 2**20:.0f} MiB, reap {reap / 2**20:.0f} MiB")
    assert reap <= 1.2 * search, (reap, search)
