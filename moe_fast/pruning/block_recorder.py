"""The block forward that records a layer's expert outputs while the calibration batches pass.

Both searches (rank-bounded: ``expert_outputs.StatsForward``; lazy: ``lazy_outputs.LazyRecorder``)
replace the block's forward with the same pass: router logits, chunks of tokens, the unpruned
block output assembled from the outputs already computed (so the layer forward that feeds the
next layer costs no extra expert work), the Gram entries against the progressive target where
there is one. They differ only in which ranked experts run up front and in what they keep;
those two steps are the subclass's. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.kernels import ops
from moe_fast.adapters import MoEAdapter
from moe_fast.routing.layer_routing import layer_routing, unpruned_weights


@dataclass
class RecordedChunk:
    """One chunk of n tokens as a recorder keeps it (d: ranks computed, H: hidden size)."""

    x: torch.Tensor  # [n, H] the block input
    logits: torch.Tensor  # [n, E] float32 router logits
    ranked: torch.Tensor  # [n, M] int32 experts by rank
    outputs: torch.Tensor  # [n, d, H] outputs of each token's d first ranks
    weights: torch.Tensor  # [n, k] float32 unpruned routing weights
    group: torch.Tensor  # [n] int64 calibration batch (one term of the objective)
    gram: torch.Tensor  # [n, d(d+1)/2] float32 Gram entries of the outputs
    target: torch.Tensor | None = None  # [n, H] progressive target less the shared path
    cross: torch.Tensor | None = None  # [n, d] float32 <output, target>
    target_sq: torch.Tensor | None = None  # [n] float32 ||target||^2


class BlockRecorder:
    """Replaces a block's forward and returns the unpruned block output. Progressive, with
    ``target`` set (by ``hidden_states``), it records against that target; ``group_id`` is the
    global calibration batch. ``store`` is what the subclass fills; it counts ``num_groups``."""

    def __init__(self, adapter: MoEAdapter, block: nn.Module, store, chunk_tokens: int) -> None:
        self.adapter, self.block, self.store = adapter, block, store
        self.routing = layer_routing(adapter, block)  # the layer's spec: ranks, weights, subset losses
        self.chunk = max(1, int(chunk_tokens))
        self.group_id = 0
        self.target: torch.Tensor | None = None  # [T, H] progressive target of the current batch

    def ranked_outputs(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ranked [n, M] int32, outputs [n, d, H]) of one chunk; d >= k."""
        raise NotImplementedError

    def keep(self, chunk: RecordedChunk) -> None:
        """Stores what the search needs of one chunk."""
        raise NotImplementedError

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter, k = self.adapter, self.adapter.top_k
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = adapter.router_logits(self.block, x).float().contiguous()
        extra = adapter.extra_output(self.block, x)
        out = torch.empty_like(x)
        for lo in range(0, x.shape[0], self.chunk):
            hi = min(x.shape[0], lo + self.chunk)
            lg = logits[lo:hi].contiguous()
            xs = x[lo:hi].contiguous()
            ranked, y = self.ranked_outputs(xs, lg)
            w = unpruned_weights(lg, ranked, self.routing)  # unpruned weights = first k ranked slots
            out[lo:hi] = (w.unsqueeze(-1) * y[:, :k].float()).sum(1).to(out.dtype)
            group = torch.full((hi - lo,), self.group_id, dtype=torch.int64, device=x.device)
            chunk = RecordedChunk(xs, lg, ranked, y, w, group, gram=None)
            if self.target is None:
                chunk.gram = ops.expert_gram(y)[0]
            else:
                z = self.target[lo:hi]
                if extra is not None:  # the shared path on this input does not depend on pruning
                    z = z - extra[lo:hi]
                chunk.target = z.to(y.dtype).contiguous()
                chunk.gram, chunk.cross, chunk.target_sq = ops.expert_gram(y, chunk.target)
            self.keep(chunk)
            del chunk, y  # one chunk's outputs alive at a time (unless the store keeps them)
        self.store.num_groups = max(self.store.num_groups, self.group_id + 1)
        if extra is not None:
            out = out + extra.to(out.dtype)
        return adapter.block_return(out.view(shape))
