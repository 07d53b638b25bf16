"""The CPU route kernel at each instruction level (scalar, AVX2) gives the same routing.

The level is fixed when the extension first routes (MOE_FAST_CPU_CAPABILITY, else
ATEN_CPU_CAPABILITY; CpuLevel in moe_fast/kernels.h), so each level runs in its own process on the
same inputs: ids, counts, offsets and perm must be identical, weights within 2 float32 ulps.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_fast

ROOT = Path(moe_fast.__file__).resolve().parent.parent

# Routes every case of the input file at the level the environment picks; saves the outputs.
WORKER = """
import sys, torch
import moe_fast
from moe_fast import _C, ops
cases = torch.load(sys.argv[1])
out = [tuple(ops.route(c["x"], c["k"], c["renorm"], c["beta"], c["keep"])) for c in cases]
torch.save({"level": _C.route_cpu_capability(), "out": out}, sys.argv[2])
"""


def adversarial_logits(T: int, E: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows, rows of ties, and rows with NaN, +-inf, -0, all -inf and all NaN."""
    x = torch.randn(T, E) * 3
    x[T // 4 : T // 2] = torch.randint(-2, 3, (T // 2 - T // 4, E)).float()
    special = torch.tensor([math.nan, -math.inf, math.inf, -0.0])
    picks = torch.rand(T, E) < 0.15
    x[picks] = special[torch.randint(0, 4, (int(picks.sum()),))]
    x[0], x[1], x[2] = math.nan, -math.inf, 0.5
    return x.to(dtype)


def all_cases() -> list[dict]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for E in (1, 3, 8, 9, 64, 256, 384, 512):
            x = adversarial_logits(203 if E < 64 else 37, E, dtype)
            keep = torch.arange(E) % 3 != 1
            for k in (1, 2, 4, 8):
                if k > E:
                    continue
                # beta = 1 puts every tie exactly on the skip border (skipped only below it).
                for beta in (None, 0.5, 1.0, [0.9] + [0.05] * (k - 2) if k > 2 else 1e-3):
                    for renorm in (True, False):
                        masks = [None] + ([keep] if int(keep.sum()) >= k else [])
                        cases += [dict(x=x, k=k, renorm=renorm, beta=beta, keep=m) for m in masks]
    return cases


def route_at(level: str, inputs: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{level}.pt"
    env = {**os.environ, "MOE_FAST_CPU_CAPABILITY": level, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-c", WORKER, str(inputs), str(out)], env=env, check=True, timeout=600)
    return torch.load(out)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in float32 ulps (both are finite and >= 0 here)."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max()) if a.numel() else 0


def test_scalar_and_avx2_route_identically(tmp_path: Path) -> None:
    cases = all_cases()
    inputs = tmp_path / "cases.pt"
    torch.save(cases, inputs)
    avx2 = route_at("avx2", inputs, tmp_path)
    if avx2["level"] != "avx2":
        pytest.skip("this CPU or build has no AVX2 route kernel")
    scalar = route_at("default", inputs, tmp_path)
    assert scalar["level"] == "default", "MOE_FAST_CPU_CAPABILITY=default did not take effect"
    worst = 0
    for case, a, b in zip(cases, scalar["out"], avx2["out"]):
        what = f"E={case['x'].shape[1]} k={case['k']} {case['x'].dtype} beta={case['beta']} renorm={case['renorm']}"
        for name, u, v in zip(("ids", "counts", "offsets", "perm"), a[1:], b[1:]):
            assert torch.equal(u, v), f"{name} differ: {what}"
        assert torch.isfinite(b[0]).all() and (b[0] >= 0).all(), what
        worst = max(worst, ulps(a[0], b[0]))
    assert worst <= 2, f"weights differ by {worst} ulps"


def test_route_level_follows_the_environment() -> None:
    probe = "from moe_fast import _C; print(_C.route_cpu_capability())"

    def level(**env: str) -> str:
        full = {k: v for k, v in os.environ.items() if k not in ("MOE_FAST_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
        full["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        run = subprocess.run([sys.executable, "-c", probe], env={**full, **env}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    best = level()
    assert best in ("default", "avx2")
    assert level(ATEN_CPU_CAPABILITY="default") == "default"
    assert level(MOE_FAST_CPU_CAPABILITY="default", ATEN_CPU_CAPABILITY="avx2") == "default"
    # Asking for more than the CPU has gives what it has; our switch wins over ATen's.
    assert level(ATEN_CPU_CAPABILITY="avx512") == best
    assert level(MOE_FAST_CPU_CAPABILITY="avx2", ATEN_CPU_CAPABILITY="default") == best
