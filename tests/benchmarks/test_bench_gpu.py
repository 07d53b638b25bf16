"""The CPU-computable parts of benchmarks/bench_gpu.py: byte and FLOP counts, the roofline."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parent.parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "bench_gpu.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_route_cost_by_hand(bench) -> None:
    # T=2, E=4, k=1, float32 logits: 2*4*4 read; weights+ids+perm 3 * 2*1*4 = 24; counts 4 + offsets 5 ints.
    assert bench.route_cost(2, 4, 1, 4) == (32 + 24 + 36, 4 * 2 * 4)


def test_gram_cost_by_hand(bench) -> None:
    # T=1, M=2, H=3, bf16: outputs 12 bytes, gram 3 floats; 3 dots of length 3.
    assert bench.gram_cost(1, 2, 3, 2, False) == (12 + 12, 2 * 3 * 3)
    # With a target: + target 6 bytes, cross 2 floats, target_sq 1 float; + 3 dots.
    assert bench.gram_cost(1, 2, 3, 2, True) == (12 + 12 + 6 + 8 + 4, 2 * 3 * 6)


def test_subset_loss_cost_by_hand(bench) -> None:
    # T=1, E=4, M=3, k=1, C=2, G=1, layer-wise: gram 6 floats, ids 3, tw 3, logits 4 -> 64 + 16 bytes;
    # out 2 doubles. FLOPs per (candidate, token): 3 + 21 + 3 * 3 = 33 (n = 2 slots: 3 pairs).
    assert bench.subset_loss_cost(1, 4, 3, 1, 2, 1, True, True) == (24 + 12 + 16 + 12 + 16 + 16, 2 * 33)
    nbytes, flops = bench.subset_loss_cost(1, 4, 3, 1, 2, 1, False, False)
    assert nbytes == 24 + 12 + 16 + 12 + 4 + 16 + 16 and flops == 2 * (3 + 21 + 3 + 21 * 4)


def test_roofline_picks_the_binding_limit(bench) -> None:
    # 4.3 GB in 2 ms against a 1 ms memory floor: 50% of HBM, memory bound, 2x from the roofline.
    r = bench.roofline(2e-3, int(4.3e9), 10**9, bench.H200_BF16_FLOPS)
    assert r["bound"] == "memory" and math.isclose(r["hbm_pct"], 50.0) and math.isclose(r["x_from_roofline"], 2.0)
    assert math.isclose(r["gb_s"], 2150.0) and math.isclose(r["tflop_s"], 0.5)
    # 790 TFLOP in 2 s with few bytes: compute bound, 50% of peak.
    r = bench.roofline(2.0, 1000, int(790e12), bench.H200_BF16_FLOPS)
    assert r["bound"] == "compute" and math.isclose(r["peak_pct"], 50.0) and math.isclose(r["roofline_ms"], 1000.0)


def test_bench_gpu_main_without_a_gpu(bench, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--quick"])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    assert bench.main() == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_selection_agreement_ignores_order(bench) -> None:
    ids = torch.tensor([[3, 1], [0, 2], [5, 4]], dtype=torch.int32)
    want = torch.tensor([[1, 3], [0, 2], [4, 6]])
    assert bench.selection_agreement(ids, want) == pytest.approx(2 / 3)
    assert bench.selection_agreement(ids[:0], want[:0]) == 1.0


def test_deepseek_baseline_routes_as_the_reference(bench) -> None:
    # The GPU row's baseline is DeepSeek-V3's routing: same selection, same weights as route_spec.
    from moe_fast import reference
    from moe_fast.kernels.routing_spec import RoutingSpec

    torch.manual_seed(0)
    E, k = 64, 6
    bias = torch.randn(E) * 0.1
    logits = torch.randn(200, E)
    w, idx, plan = bench.deepseek_v3_route_dispatch(logits, bias, 8, 3, k, 2.5)
    want = reference.route_spec(logits, RoutingSpec("sigmoid", k, True, 2.5, bias, 8, 3))
    assert bench.selection_agreement(idx, want.ids) == 1.0
    order = idx.argsort(-1)
    torch.testing.assert_close(w.gather(1, order), want.weights.gather(1, want.ids.long().argsort(-1)))
    assert sum(len(tokens) for _, tokens in plan) == 200 * k

