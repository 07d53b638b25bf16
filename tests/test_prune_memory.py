"""Streaming from a checkpoint: peak memory does not grow with the number of layers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
                               out=sys.argv[3], progress=False)
    print(json.dumps({"peak": report.peak_memory_bytes, "layers": len(report.layers)}))
    """
)


def _peak(tmp_path, layers: int) -> int:
    model = tiny_mixtral(13, layers=layers, hidden=128, ffn=FFN)  # experts: 66 MiB per layer
    src = save_checkpoint(model, tmp_path / f"src{layers}", shard="80MB")
    del model
    torch.save(torch.randint(0, 128, (8, 16)), tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, src, str(tmp_path / "ids.pt"), str(tmp_path / f"out{layers}")],
        capture_output=True, text=True, check=True,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["layers"] == layers
    return out["peak"]


def test_peak_memory_flat_in_depth(tmp_path) -> None:
    layer_bytes = 8 * 3 * 128 * FFN * 4
    shallow, deep = _peak(tmp_path, 2), _peak(tmp_path, 6)
    # Holding the model would add 4 layers (264 MiB); streaming adds well under one (allocator
    # noise is some tens of MiB).
    print(f"peak RSS: 2 layers {shallow / 2**20:.0f} MiB, 6 layers {deep / 2**20:.0f} MiB")
    assert deep - shallow < layer_bytes, (shallow, deep)
