"""Fixtures every test file may use: the devices to run op tests on, deterministic seeding, and
one torch thread for tiny models. Shared helper code lives in the ``helpers`` package."""

from __future__ import annotations

import pytest

# Helpers assert too (helpers/brute_force.py: check_layer); rewrite them like the tests' own asserts
# so that a failure shows the values. Must run before any test module imports them.
pytest.register_assert_rewrite("helpers")

import os  # noqa: E402

# Under pytest-xdist (scripts/test.sh) the workers share the cores: each gets its share of threads,
# and so do the processes its tests start (OMP_NUM_THREADS is inherited), because OpenMP threads
# spin-waiting for a core another worker holds make a run many times slower than one thread.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import torch  # noqa: E402

import moe_fast  # noqa: E402,F401  (loads the kernels)

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run far faster on one thread (no spin-waiting on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
