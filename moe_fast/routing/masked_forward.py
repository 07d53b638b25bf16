"""An MoE block's forward with some experts masked out and, optionally, slots skipped.

Why one home: pruning (progressive mode feeds each layer the pruned model's hidden states) and
the demo (which scores every candidate selection without writing a checkpoint) must run exactly
the routing a pruned checkpoint runs: dropped experts at logit -inf, top-k among the kept ones,
the same weights (``ops.route``, or ``ops.route_spec`` for other routers, with ``keep``), so a
masked model and an exported one agree.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from moe_fast.kernels import ops
from moe_fast.adapters import MoEAdapter
from moe_fast.routing.layer_routing import layer_routing, route_masked


def run_experts(
    adapter: MoEAdapter, experts: nn.Module, hidden: torch.Tensor, offsets: list[int], perm: torch.Tensor, m: int
) -> torch.Tensor:
    """Outputs [T, m, H] of each token's m planned experts (slot t * m + j in ``perm``).

    ``offsets`` are the dispatch plan's E + 1 starts (expert e's slots are perm[offsets[e]:offsets[e+1]]);
    a slot that no expert serves (a skipped slot, planned at E) stays zero.
    """
    T, H = hidden.shape
    out = hidden.new_zeros(T * m, H)
    perm = perm.long()
    for e in range(len(offsets) - 1):
        lo, hi = offsets[e], offsets[e + 1]
        if lo == hi:
            continue
        slots = perm[lo:hi]
        out[slots] = adapter.expert_forward(experts, e, hidden[slots // m]).to(out.dtype)
    return out.view(T, m, H)


class MaskedForward:
    """A block forward where only the ``kept`` experts may route and, with ``betas``, slots may be skipped.

    ``kept`` None (or every expert) masks nothing. ``chunk_tokens`` bounds how many tokens' expert
    outputs are held at once (None: all). Counts the expert outputs it computed and the routing
    slots it saw, for expert FLOPs per token and the skip rate.
    """

    def __init__(self, adapter: MoEAdapter, block: nn.Module, kept: Sequence[int] | None = None,
                 betas: Sequence[float] | None = None, chunk_tokens: int | None = None) -> None:
        self.adapter, self.block, self.betas = adapter, block, betas
        self.routing = layer_routing(adapter, block)  # the layer's spec (selection bias included)
        num_experts = adapter.num_experts
        self.keep_mask = None
        if kept is not None and len(set(kept)) < num_experts:
            self.keep_mask = torch.zeros(num_experts, dtype=torch.bool)
            self.keep_mask[list(kept)] = True
        self.chunk = None if chunk_tokens is None else max(1, int(chunk_tokens))
        self.computed = 0
        self.slots = 0

    def route(self, hidden: torch.Tensor) -> ops.RouteResult:
        """The routing of ``hidden`` [T, H] under the mask and the betas."""
        logits = self.adapter.router_logits(self.block, hidden).float().contiguous()
        return self._route(logits)

    def _route(self, logits: torch.Tensor) -> ops.RouteResult:
        keep_mask = None if self.keep_mask is None else self.keep_mask.to(logits.device)
        return route_masked(logits, self.routing, beta=self.betas, keep=keep_mask)

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter, k = self.adapter, self.adapter.top_k
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = adapter.router_logits(self.block, x).float().contiguous()
        out = torch.empty_like(x)
        step = self.chunk or max(1, x.shape[0])
        for lo in range(0, x.shape[0], step):
            hi = min(x.shape[0], lo + step)
            r = self._route(logits[lo:hi].contiguous())
            offsets = r.offsets.tolist()
            y = run_experts(adapter, self.block.experts, x[lo:hi], offsets, r.perm, k)
            out[lo:hi] = (r.weights.unsqueeze(-1) * y.float()).sum(1).to(out.dtype)
            self.computed += offsets[-1]
            self.slots += r.ids.numel()
        extra = adapter.extra_output(self.block, x)
        if extra is not None:
            out = out + extra.to(out.dtype)
        return adapter.block_return(out.view(shape))
