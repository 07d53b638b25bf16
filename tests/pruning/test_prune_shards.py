"""Pruning a checkpoint saved in several safetensors shards, streamed one layer at a time.

Checks the selections against pruning the loaded model, that the shards really are several, and
measures the streaming run's peak resident memory against the whole model's size (in a fresh
subprocess, so that the peak is this run's own).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import torch

import moe_fast
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral

FFN = 5376  # experts: 66 MiB per layer in float32

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    import moe_fast
    import moe_fast.pruning.export
    from moe_fast.host.ram import peak_rss_bytes
    from transformers import AutoModelForCausalLM, MixtralForCausalLM  # noqa: F401 - imported before the baseline
    ids = torch.load(sys.argv[2])
    base = peak_rss_bytes()  # python, torch, transformers and moe_fast imported: before any weight
    _, report = moe_fast.prune(sys.argv[1], ids, 6, batch_size=4, return_model=False, out=sys.argv[3], progress=False)
    print(json.dumps({"base": base, "peak": report.peak_memory_bytes, "kept": report.kept}))
    """
)


def test_sharded_checkpoint_streams_in_about_one_layer(tmp_path) -> None:
    layers = 8
    model = tiny_mixtral(31, layers=layers, hidden=128, ffn=FFN)
    src = save_checkpoint(model, tmp_path / "src", shard="50MB")
    shards = [f for f in os.listdir(src) if f.endswith(".safetensors")]
    assert len(shards) >= layers and os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(moe_fast.__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, src, str(tmp_path / "ids.pt"), str(tmp_path / "out")],
        capture_output=True, text=True, check=True, env=env,
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    _, ref = moe_fast.prune(copy.deepcopy(model), ids, 6, batch_size=4, progress=False)
    assert {int(i): v for i, v in out["kept"].items()} == ref.kept
    extra = out["peak"] - out["base"]
    print(f"model {model_bytes / 2**20:.0f} MiB in {len(shards)} shards, one layer {layer_bytes / 2**20:.0f} MiB; "
          f"streaming peak RSS {out['peak'] / 2**20:.0f} MiB, {extra / 2**20:.0f} MiB above the imports")
    # Loading the model would add all of it (530 MiB); streaming adds about two layers (the one
    # being read, mapped file pages) plus allocator noise, whatever the depth.
    assert extra < 4 * layer_bytes <= model_bytes / 2, (extra, layer_bytes, model_bytes)
