"""MaskedForward: the one forward of a block with experts masked (pruning's progressive mode, the demo)."""

from __future__ import annotations

import pytest
import torch

from helpers.brute_force import masked_block_forward
from helpers.tiny_models import tiny_mixtral
from moe_fast.adapters import get_adapter
from moe_fast.routing.masked_forward import MaskedForward


@pytest.fixture(scope="module")
def block_and_x():
    model = tiny_mixtral(seed=3).eval()
    adapter = get_adapter(model)
    block = adapter.moe_blocks(model)[0].block
    x = torch.randn(2, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    return adapter, block, x


@pytest.mark.parametrize("dropped", [(), (0,), (1, 5), (0, 2, 4, 6)])
@pytest.mark.parametrize("chunk", [None, 3, 64])
def test_equals_stock_block_with_dropped_router_rows(block_and_x, dropped, chunk):
    adapter, block, x = block_and_x
    kept = [e for e in range(adapter.num_experts) if e not in dropped]
    fwd = MaskedForward(adapter, block, kept, chunk_tokens=chunk)
    with torch.no_grad():
        got = fwd(x)
        want = masked_block_forward(block, x.reshape(-1, x.shape[-1]), dropped).view_as(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert fwd.computed == fwd.slots == x.shape[0] * x.shape[1] * adapter.top_k


def test_skipping_counts_fewer_outputs_and_zero_beta_skips_nothing(block_and_x):
    adapter, block, x = block_and_x
    none = MaskedForward(adapter, block, None, betas=[0.0])
    every = MaskedForward(adapter, block, None, betas=[1.0])  # w_1 < w_0 for every untied token
    with torch.no_grad():
        torch.testing.assert_close(none(x), masked_block_forward(block, x.reshape(-1, x.shape[-1]), ()).view_as(x))
        every(x)
    tokens = x.shape[0] * x.shape[1]
    assert none.computed == 2 * tokens
    assert every.slots == 2 * tokens and tokens <= every.computed < 2 * tokens
