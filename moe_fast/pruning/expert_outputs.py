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

from moe_fast.kernels import ops
from moe_fast.routing import runtime as routing_runtime
from moe_fast.adapters import MoEAdapter
from moe_fast.routing.layer_routing import ranked_ids
from moe_fast.routing.masked_forward import run_experts
from moe_fast.pruning.block_recorder import BlockRecorder, RecordedChunk
from moe_fast.kernels.routing_spec import RoutingSpec


def ranked_plan(
    logits: torch.Tensor, m: int, spec: RoutingSpec | None = None
) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Each token's m ranked experts (ids [T, m] int32) and the dispatch plan (offsets, perm).

    Softmax routers (``spec`` None or plain softmax) use the fused ``ops.route`` up to its top-k
    limit (8) and the plain-torch ranking (same rules) beyond, for greedy/beam searches with many
    drops; other routers rank by ``spec`` (``layer_routing.ranked_ids``).
    """
    num_experts = logits.shape[1]
    if spec is not None and not spec.is_plain_softmax:
        ids = ranked_ids(logits, m, spec)
        _, offsets, perm = routing_runtime.dispatch_plan(ids.cpu(), num_experts)
        return ids, offsets.tolist(), perm.to(logits.device)
    if m <= 8:
        r = ops.route(logits, m)
        return r.ids, r.offsets.tolist(), r.perm
    order, _ = routing_runtime.rank_experts(logits)
    ids = order[:, :m].to(torch.int32).contiguous()
    _, offsets, perm = routing_runtime.dispatch_plan(ids.cpu(), num_experts)
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


class StatsForward(BlockRecorder):
    """Records LayerStats: every token's M = rank_bound first ranks run up front.

    Layer-wise (``target`` None) it keeps the unpruned routing weights as the target; progressive
    the cross products with the given target. It returns the unpruned block output either way.
    """

    def __init__(self, adapter: MoEAdapter, block: nn.Module, rank_bound: int, stats: LayerStats, chunk_tokens: int) -> None:
        super().__init__(adapter, block, stats, chunk_tokens)
        self.rank_bound = rank_bound

    def ranked_outputs(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, offsets, perm = ranked_plan(logits, self.rank_bound, self.routing)
        return ids, run_experts(self.adapter, self.block.experts, x, offsets, perm, self.rank_bound)

    def keep(self, chunk: RecordedChunk) -> None:
        st, k = self.store, self.adapter.top_k
        if chunk.target is None:
            tw = torch.zeros(chunk.x.shape[0], self.rank_bound, dtype=torch.float32, device=chunk.x.device)
            tw[:, :k] = chunk.weights
            st.target_weights.append(tw)
        else:
            st.cross.append(chunk.cross)
            st.target_sq.append(chunk.target_sq)
        st.gram.append(chunk.gram)
        st.ids.append(chunk.ranked)
        st.logits.append(chunk.logits)
        st.group.append(chunk.group)
