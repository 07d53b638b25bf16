"""Rank-bounded expert outputs of one MoE block, their Gram entries, and pruned block forwards.

For every calibration token the block's M = k + dropped highest-ranked experts are run once
(the rank bound: README, "expert_gram and subset_loss"); their outputs only live for one chunk of tokens, long
enough to take the Gram entries (``ops.expert_gram``). What is kept for the whole layer is small:
per token the Gram entries, the M ranked ids, the router logits, the calibration batch and the
target (unpruned routing weights in layer-wise mode, cross products in progressive mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moe_fast import ops, reference
from moe_fast.adapters import MoEAdapter
from moe_fast.masked_forward import run_experts


def ranked_plan(logits: torch.Tensor, m: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Each token's m ranked experts (ids [T, m] int32) and the dispatch plan (offsets, perm).

    Uses the fused ``ops.route`` up to its top-k limit (8) and the plain-torch ranking (same
    rules) beyond, for greedy/beam searches with many drops.
    """
    num_experts = logits.shape[1]
    if m <= 8:
        r = ops.route(logits, m)
        return r.ids, r.offsets.tolist(), r.perm
    order, _ = reference.rank_experts(logits)
    ids = order[:, :m].to(torch.int32).contiguous()
    _, offsets, perm = reference.dispatch_plan(ids.cpu(), num_experts)
    return ids, offsets.tolist(), perm.to(logits.device)


@dataclass
class LayerStats:
    """Per-token inputs of ``ops.subset_loss`` for every calibration token of one layer."""

    rank_bound: int  # M: ranked experts per token in ``ids`` and the Gram entries
    gram: list[torch.Tensor] = field(default_factory=list)
    ids: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    group: list[torch.Tensor] = field(default_factory=list)
    target_weights: list[torch.Tensor] = field(default_factory=list)
    cross: list[torch.Tensor] = field(default_factory=list)
    target_sq: list[torch.Tensor] = field(default_factory=list)
    num_groups: int = 0

    def finish(self) -> dict[str, torch.Tensor | None]:
        cat = lambda parts: torch.cat(parts).contiguous() if parts else None  # noqa: E731
        return {
            "gram": cat(self.gram),
            "ids": cat(self.ids),
            "logits": cat(self.logits),
            "group": cat(self.group),
            "target_weights": cat(self.target_weights),
            "cross": cat(self.cross),
            "target_sq": cat(self.target_sq),
        }


class StatsForward:
    """Replaces a block's forward while the calibration batches pass: records LayerStats.

    Layer-wise (``targets`` None) it returns the unpruned block output, assembled from the
    outputs already computed, so the layer forward that feeds the next layer costs no extra
    expert work. Progressive it records against the given target and returns the unpruned
    output too (the caller discards it).
    """

    def __init__(self, adapter: MoEAdapter, block: nn.Module, rank_bound: int, stats: LayerStats, chunk_tokens: int) -> None:
        self.adapter, self.block, self.rank_bound, self.stats = adapter, block, rank_bound, stats
        self.chunk = max(1, int(chunk_tokens))
        self.group_id = 0
        self.target: torch.Tensor | None = None  # [T, H] progressive target of the current batch

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter, k, m = self.adapter, self.adapter.top_k, self.rank_bound
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = adapter.router_logits(self.block, x).float().contiguous()
        extra = adapter.extra_output(self.block, x)
        out = torch.empty_like(x)
        st = self.stats
        for lo in range(0, x.shape[0], self.chunk):
            hi = min(x.shape[0], lo + self.chunk)
            lg = logits[lo:hi].contiguous()
            ids, offsets, perm = ranked_plan(lg, m)
            y = run_experts(adapter, self.block.experts, x[lo:hi], offsets, perm, m)
            w = ops.route(lg, k, adapter.renormalize).weights  # unpruned weights = first k ranked slots
            out[lo:hi] = (w.unsqueeze(-1) * y[:, :k].float()).sum(1).to(out.dtype)
            if self.target is None:
                gram, _, _ = ops.expert_gram(y)
                tw = torch.zeros(hi - lo, m, dtype=torch.float32, device=x.device)
                tw[:, :k] = w
                st.target_weights.append(tw)
            else:
                target = self.target[lo:hi]
                if extra is not None:  # the shared path on this input does not depend on pruning
                    target = target - extra[lo:hi]
                gram, cross, tsq = ops.expert_gram(y, target.to(y.dtype).contiguous())
                st.cross.append(cross)
                st.target_sq.append(tsq)
            st.gram.append(gram)
            st.ids.append(ids)
            st.logits.append(lg)
            st.group.append(torch.full((hi - lo,), self.group_id, dtype=torch.int64, device=x.device))
            del y
        st.num_groups = max(st.num_groups, self.group_id + 1)
        if extra is not None:
            out = out + extra.to(out.dtype)
        return out.view(shape)
