"""The plain reference of the paper's skipping forward (helpers/reference_blocks.py) against
stock transformers: without skipping it must be the stock eager block, with skipping it differs.
"""

from __future__ import annotations

import pytest
import torch

from helpers.reference_blocks import reference_forward, rel_err
from helpers.tiny_models import FAMILIES, VOCAB, tiny_model


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_without_skipping_is_stock_eager(family):
    model = tiny_model(family, experts_implementation="eager")
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        stock = model(ids).logits
        with reference_forward(model):
            ref = model(ids).logits
    assert rel_err(ref, stock) < 1e-5


def test_reference_skipping_changes_the_output():
    model = tiny_model("mixtral", experts_implementation="eager")
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        stock = model(ids).logits
        with reference_forward(model, {0: [0.9], 1: [0.9]}):
            ref = model(ids).logits
    assert rel_err(ref, stock) > 1e-3
