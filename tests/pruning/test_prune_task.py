"""Task-specific pruning: the same command with task text keeps the experts that text routes to."""

from __future__ import annotations

import pytest
import torch

import moe_fast
from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import tiny_mixtral, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_domain_model():
    """Words w0..w63 route only to experts 0-3, words w64..w126 only to experts 4-7."""
    model = tiny_mixtral(12, layers=1, hidden=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()  # the block sees the (normalized) embeddings
        gate = torch.zeros(8, 32)
        for e in range(8):
            gate[e, e] = 4.0
        layer.mlp.gate.weight.copy_(gate)
        emb = 0.01 * torch.randn(128, 32, generator=g)
        emb[:64, 0:4] += torch.rand(64, 4, generator=g) + 0.5
        emb[64:, 4:8] += torch.rand(64, 4, generator=g) + 0.5
        model.model.embed_tokens.weight.copy_(emb)
    return model


def test_task_text_picks_its_experts(tmp_path) -> None:
    src = save_checkpoint(_two_domain_model(), tmp_path / "src", tokenizer=tiny_tokenizer())
    g = torch.Generator().manual_seed(1)
    task_a = tmp_path / "a.txt"
    task_a.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 64, (600,), generator=g)))
    task_b = tmp_path / "b.txt"
    task_b.write_text(" ".join(f"w{int(i)}" for i in torch.randint(64, 127, (600,), generator=g)))
    kept = {}
    for name, spec in (("a", task_a), ("b", task_b)):
        _, report = moe_fast.prune(src, str(spec), 4, n_samples=8, seq_len=32, batch_size=4, return_model=False,
                                   out=str(tmp_path / f"out_{name}"), progress=False)
        kept[name] = report.layers[0].kept
        assert report.settings["calibration"]["n_samples"] == 8
    assert kept == {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}
