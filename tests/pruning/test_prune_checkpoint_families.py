"""Pruning a checkpoint on disk into an output directory goes through the adapters of Qwen2-MoE
(shared expert), Qwen3-MoE and OLMoE: the exported model equals the original with the dropped
experts masked. (tests/pruning/test_prune_brute_force_families.py checks the choice itself.)"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
)

import moe_fast

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=8)),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(moe_intermediate_size=16, num_experts=8, norm_topk_prob=False)),
    "olmoe": (OlmoeConfig, OlmoeForCausalLM, dict(num_experts=8, pad_token_id=0, eos_token_id=1, bos_token_id=1)),
}


class _masked:
    """Stock router with the dropped experts' logits at -inf (written here, not moe_fast's)."""

    def __init__(self, model, dropped) -> None:
        self.model, self.dropped = model, dropped

    def __enter__(self):
        for i, d in self.dropped.items():
            gate = self.model.model.layers[i].mlp.gate

            def fwd(h, gate=gate, d=list(d)):
                h = h.reshape(-1, gate.weight.shape[1])
                logits = torch.nn.functional.linear(h, gate.weight)
                lg = logits.float().clone()
                lg[:, d] = -math.inf
                top, idx = torch.topk(torch.softmax(lg, -1), gate.top_k, -1)
                if getattr(gate, "norm_topk_prob", False):
                    top = top / top.sum(-1, keepdim=True)
                return logits, top.to(logits.dtype), idx

            gate.forward = fwd

    def __exit__(self, *exc):
        for i in self.dropped:
            del self.model.model.layers[i].mlp.gate.forward


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["layerwise", "progressive"])
def test_family_export_equals_masked_model(family, mode, tmp_path) -> None:
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = config_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, num_experts_per_tok=2, **extra)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(0, 64, (8, 16))
    pruned, report = moe_fast.prune(str(tmp_path / "src"), ids, 5, out=str(tmp_path / "out"), mode=mode, batch_size=4, progress=False)
    assert all(len(r.kept) == 5 for r in report.layers.values()) and len(report.layers) == 2
    with torch.no_grad(), _masked(model, {i: r.dropped for i, r in report.layers.items()}):
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, atol=2e-5, rtol=1e-4)
