"""generate() of a patched model (KV cache, left-padded batch) against a reference decode.

The reference recomputes the whole sequence without a cache, with every sparse block replaced by
the plain reference of the paper's skipping forward (helpers/reference_blocks.py).

float32: the patched model's greedy tokens equal the reference's free-running greedy decode.
bfloat16: which of two logits within rounding of each other is larger depends on the CPU's
vector instructions (oneDNN / ATen kernels), so equal tokens prove nothing there and fail by
chance on other CPUs. The reference is teacher-forced along the patched model's tokens instead,
and at every step the two must agree to within transformers' own disagreement with itself,
measured in the same test on the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import moe_fast
from helpers.reference_blocks import reference_forward
from helpers.tiny_models import VOCAB, tiny_model

NEW_TOKENS = 8
pytestmark = pytest.mark.numerics


def left_padded_batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    lengths = [11, 6, 9]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def reference_greedy(model, ids: torch.Tensor, mask: torch.Tensor, betas: dict) -> torch.Tensor:
    with torch.no_grad(), reference_forward(model, betas):
        for _ in range(NEW_TOKENS):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            nxt = logits[:, -1].float().argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


class ForceTokens(LogitsProcessor):
    """Makes generate() emit the given tokens, so that its own logits along them can be read."""

    def __init__(self, tokens: torch.Tensor, prompt_width: int):
        self.tokens, self.prompt_width = tokens, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        nxt = self.tokens[:, input_ids.shape[1] - self.prompt_width]
        return torch.full_like(scores, -torch.inf).scatter_(1, nxt[:, None], 0.0)


def cached_decode(model, ids, mask, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """generate() with the KV cache -> (new tokens [B, N], raw float32 logits of each step [B, N, V])."""
    extra = {} if forced is None else {"logits_processor": LogitsProcessorList([ForceTokens(forced, ids.shape[1])])}
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
        pad_token_id=model.config.pad_token_id, eos_token_id=None, output_logits=True, return_dict_in_generate=True,
        **extra,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


def uncached_logits(model, ids, mask, new: torch.Tensor) -> torch.Tensor:
    """Teacher forcing without a cache: the float32 logits that predict each token of ``new`` [B, N, V]."""
    seq = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=seq, attention_mask=full_mask, position_ids=positions, use_cache=False).logits
    return logits[:, ids.shape[1] - 1 : -1].float()


def top_within(logits: torch.Tensor, tokens: torch.Tensor, tol: float) -> torch.Tensor:
    """Whether each token's logit is within ``tol`` of its step's top logit (a tie to that precision)."""
    return logits.gather(-1, tokens[..., None])[..., 0] >= logits.amax(-1) - tol


@pytest.mark.parametrize(
    "family, dtype",
    [("mixtral", torch.float32), ("mixtral", torch.bfloat16), ("qwen2_moe", torch.float32), ("qwen3_moe", torch.bfloat16)],
)
def test_generate_matches_reference_decode(family, dtype):
    model = tiny_model(family, dtype)
    ids, mask = left_padded_batch(model.config.pad_token_id)
    cal = moe_fast.calibrate_skipping(model, torch.randint(3, VOCAB, (4, 16)), progress=False)
    betas = dict(zip(cal.layers, cal.betas))
    stock_impl = model.config._experts_implementation

    with torch.no_grad():
        moe_fast.patch(model, betas=cal)
        got, patched = cached_decode(model, ids, mask)
        moe_fast.unpatch(model)
        with reference_forward(model, betas):
            ref = uncached_logits(model, ids, mask, got)
        with reference_forward(model):
            no_skip = uncached_logits(model, ids, mask, got)
        # Transformers' own gap, on the same tokens: its cached decode with grouped_mm experts
        # against its uncached forward with eager experts (two paths it treats as equal).
        model.set_experts_implementation(stock_impl if stock_impl != "eager" else "grouped_mm")
        stock_cached = cached_decode(model, ids, mask, forced=got)[1]
        model.set_experts_implementation("eager")
        stock_uncached = uncached_logits(model, ids, mask, got)
    gap = float((stock_cached - stock_uncached).abs().max())
    # Ours and the reference may each be a gap away from exact logits: at most twice apart.
    tol = 2 * gap

    if dtype == torch.float32:
        assert torch.equal(torch.cat([ids, got], dim=1), reference_greedy(model, ids, mask, betas))
    # Every step: the logits agree, and each side's token is the other's top logit to within tol.
    assert float((patched - ref).abs().max()) <= tol, (float((patched - ref).abs().max()), gap)
    assert top_within(patched, ref.argmax(-1), tol).all()
    assert top_within(ref, got, tol).all()
    # Skipping moves the logits on these tokens by more than twice the tolerance, so a patched model
    # that ignored the betas (within tol of no_skip) could not pass the check above.
    assert float((no_skip - ref).abs().max()) > 2 * tol
