"""The load-balancing losses the shipped models were trained with, against transformers' own loss."""

from __future__ import annotations

import pytest
import torch

from train_small_models import per_layer_balance_loss, per_sequence_balance_loss

lbl = pytest.importorskip("transformers.models.mixtral.modeling_mixtral").load_balancing_loss_func


@pytest.mark.parametrize("batch,seq,experts,top_k", [(3, 5, 8, 2), (2, 16, 32, 4), (1, 7, 4, 1)])
def test_per_sequence_is_transformers_loss_on_each_sequence(batch, seq, experts, top_k):
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    logits = tuple(torch.randn(batch * seq, experts, generator=gen) * 2 for _ in range(3))
    expected = torch.stack(
        [torch.stack([lbl((l.view(batch, seq, experts)[b],), experts, top_k) for b in range(batch)]).mean() for l in logits]
    ).mean()
    got = per_sequence_balance_loss(logits, batch, experts, top_k)
    torch.testing.assert_close(got, expected)


def test_per_sequence_differs_from_whole_batch_when_sequences_disagree():
    """Two sequences each sending every token to a different expert: the batch looks balanced,
    each sequence does not, so only the per-sequence loss is high."""
    experts, seq = 2, 4
    row0 = torch.tensor([[5.0, -5.0]]).repeat(seq, 1)
    row1 = torch.tensor([[-5.0, 5.0]]).repeat(seq, 1)
    logits = (torch.cat([row0, row1]),)
    whole = per_layer_balance_loss(logits, experts, 1)
    per_seq = per_sequence_balance_loss(logits, 2, experts, 1)
    # batch: half the tokens and half the probability mass per expert -> 2 * (0.5 * 0.5 * 2) = 1.0
    assert whole.item() == pytest.approx(1.0, abs=1e-3)
    # each sequence: all tokens on one expert with probability ~1 -> 2 * 1 * 1 = 2.0
    assert per_seq.item() == pytest.approx(2.0, abs=1e-3)
