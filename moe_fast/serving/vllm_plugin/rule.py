"""The paper's skip rule applied to a serving engine's final router output.

Why its own module: vLLM's routers return each token's k experts unordered (``topk`` with
``sorted=False``) and already weighted (renormalized, scaled, biased choice): the rule of
``moe_fast.reference.route_spec`` has to be re-expressed on that output. Slot order and the
log-ratio come from the router logits exactly as the reference takes them (by logit for the softmax
scorings; for sigmoid by ``sigmoid(l) + selection_bias`` for order and ``log sigmoid(l)`` for the
ratio), so the decisions are the reference's. This module imports no vLLM: it is tested in the main
environment against ``reference.route_spec``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def skip_thresholds(betas: Sequence[float], k: int) -> torch.Tensor:
    """[k] float64 log-gaps: slot 0 never skips (inf); rank j >= 1 skips when its gap exceeds -log(beta_j)."""
    if len(betas) != k - 1:
        raise ValueError(f"skip_thresholds: need k - 1 = {k - 1} betas, got {len(betas)}")
    gaps = [math.inf] + [math.inf if b == 0.0 else -math.log(b) for b in betas]
    return torch.tensor(gaps, dtype=torch.float64)


def skipped_mask(
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    thresholds: torch.Tensor,
    sigmoid: bool,
    selection_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, k] bool, in the engine's slot layout: which of each token's chosen experts the rule skips.

    ``router_logits`` [T, E] are the router's logits (gpt-oss: with its router bias); ``topk_ids``
    [T, k] the engine's chosen experts in any order. Ranks follow the selection score, ties to the
    lower expert index; rank j >= 1 is skipped when ``log w_rank0 - log w_rankj > -log(beta_j)``.
    """
    ids = topk_ids.long()
    logits = router_logits.float().gather(-1, ids)  # [T, k]
    if sigmoid:
        scores = torch.sigmoid(logits)
        select = scores if selection_bias is None else scores + selection_bias.float()[ids]
        log_w = torch.log(scores.double())
    else:
        select = logits
        log_w = logits.double()
    by_id = torch.sort(ids, dim=-1, stable=True).indices  # ties: the lower expert index first
    order = torch.gather(by_id, -1, torch.sort(torch.gather(select, -1, by_id), dim=-1, descending=True, stable=True).indices)
    ranked = torch.gather(log_w, -1, order)
    skip_ranked = (ranked[:, :1] - ranked) > thresholds.to(ranked.device)
    return torch.zeros_like(skip_ranked).scatter_(-1, order, skip_ranked)


def apply_skips(topk_weights: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
    """Weights with skipped slots 0 and the survivors scaled to the sum the k weights had."""
    w = topk_weights.float()
    kept = w.masked_fill(skipped, 0.0)
    scale = w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True)
    return (kept * scale).to(topk_weights.dtype)
