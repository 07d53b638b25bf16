"""``moe-fast prune --plan``: budgets from config.json alone, checked against hand-counted formulas."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from transformers import MixtralConfig

import moe_fast
from moe_fast.pruning.plan import plan_table, prune_plan

H, F, LAYERS, E, K, V, KV_HEADS, HEADS = 6144, 16384, 56, 8, 2, 32768, 8, 48


@pytest.fixture
def x22(tmp_path) -> str:
    cfg = MixtralConfig(hidden_size=H, intermediate_size=F, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=KV_HEADS, num_local_experts=E, num_experts_per_tok=K, vocab_size=V,
                        dtype="bfloat16")
    cfg.save_pretrained(tmp_path / "x22")
    assert os.listdir(tmp_path / "x22") == ["config.json"]  # no weights anywhere
    return str(tmp_path / "x22")


def test_mixtral_8x22b_plan(x22) -> None:
    keep, n, L, bs = 6, 128, 2048, 8
    plan = prune_plan(x22, keep, n_samples=n, seq_len=L, batch_size=bs, mode="progressive", chunk_tokens=4096)
    kv = KV_HEADS * (H // HEADS)
    layer_params = 2 * H * H + 2 * H * kv + E * H + E * 3 * H * F + 2 * H
    model_params = LAYERS * layer_params + 2 * V * H + H  # embedding, lm head, final norm
    assert 140e9 < model_params < 142e9  # "141B parameters"
    assert plan["model_bytes"] == 2 * model_params
    assert all(r["weight_bytes"] == 2 * layer_params for r in plan["layers"])
    tokens = n * L
    m = K + E - keep
    assert plan["rank_bound"] == m == 4
    assert plan["hidden_state_bytes"] == 2 * tokens * H * 2  # two streams, bf16
    assert plan["layers"][0]["expert_outputs_chunk_bytes"] == 4096 * m * H * 2
    per_expert_token = 2 * 3 * H * F
    assert plan["layers"][0]["expert_flops"] == pytest.approx(tokens * m * per_expert_token)
    assert plan["layers"][0]["paper_expert_flops"] == pytest.approx(tokens * (1 + math.comb(E, keep)) * K * per_expert_token)
    assert plan["flop_ratio"] == pytest.approx((1 + 28) * 2 / 4)
    # One layer plus the hidden states: a small fraction of the 262 GiB model.
    assert plan["peak_bytes"] < plan["model_bytes"] / 20
    assert "0-55" in plan_table(plan)
    sharded = prune_plan(x22, keep, n_samples=n, seq_len=L, batch_size=bs, world_size=4)
    assert sharded["tokens_per_rank"] == tokens // 4


def test_plan_cli_json(x22) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(moe_fast.__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "moe_fast.cli", "prune", x22, "--keep", "4", "--plan", "--json", "--n-samples", "64", "--seq-len", "512"],
        capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=root),
    )
    plan = json.loads(proc.stdout)
    assert plan["tokens_per_rank"] == 64 * 512 and plan["rank_bound"] == 6 and len(plan["layers"]) == LAYERS
    table = subprocess.run(
        [sys.executable, "-m", "moe_fast.cli", "prune", x22, "--keep", "4", "--plan"],
        capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=root),
    ).stdout
    assert "expert TFLOP" in table and "streaming peak" in table


def test_plan_rejects_bad_keep(x22) -> None:
    with pytest.raises(ValueError, match="keep"):
        prune_plan(x22, 8)
