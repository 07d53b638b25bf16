"""Shared test helpers: the devices to run op tests on, and deterministic seeding."""

from __future__ import annotations

import pytest
import torch

import moe_fast  # noqa: F401  (loads the kernels)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
