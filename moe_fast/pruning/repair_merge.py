"""Merge repair of a pruned MoE layer: fold each dropped expert into the kept expert it resembles.

Why: pruning throws the dropped experts' weights away; merging keeps part of them inside the kept
experts, so the export keeps its ordinary shape (r experts per layer, no extra module). One pass
over the layer's calibration tokens gathers, with the unpruned routing:

- each expert's routing mass m_e = sum over tokens of its routing weight;
- for every dropped expert d and kept expert c, on the tokens routed to d (weighted by d's routing
  weight w_td): S_dc = sum_t w_td <o_d(x_t), o_c(x_t)>, and the norms sum_t w_td ||o_d||^2,
  sum_t w_td ||o_c||^2, whose ratio is the cosine of the two experts' outputs where d worked.

Each dropped expert goes to the kept expert whose outputs its own match best (largest cosine; ties
to the lower index), and every kept expert c with dropped experts D_c becomes the mass-weighted
average of its own weights and theirs, all of gate_up_proj and down_proj:

    W'_c = (m_c W_c + s sum_{d in D_c} m_d W_d) / (m_c + s sum_{d in D_c} m_d)

with a merge strength s from ``STRENGTHS``. The router rows are left as they are (docs/REPAIR.md
says why). A second pass measures the run's objective for every strength with the merged weights
as stored, run the way the export routes (``MaskedForward``); the strength with the least loss is
kept, and if none lowers the pruned loss the layer is left as pruned (``reverted``). A dropped
expert that receives no routing mass, or s = 0, changes nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_fast.adapters import MoEAdapter
from moe_fast.routing.layer_routing import layer_routing, route_masked
from moe_fast.routing.masked_forward import MaskedForward
from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.hidden_states import HiddenStates
from moe_fast.pruning.repair import RankSums, Rows, block_io, keep_if_lower, layer_losses, objective_loss, squared_error

STRENGTHS = (0.0625, 0.125, 0.25, 0.5, 1.0)  # s: how much of the dropped experts' mass goes into the average


def merged_rows(experts: nn.Module, assignment: dict[int, int], mass: torch.Tensor, strength: float) -> Rows:
    """The merged weights {kept c: {"gate_up_proj", "down_proj"}} of every kept expert that receives
    dropped experts of positive weight (``assignment``: dropped d -> kept c; ``mass`` [E]); a kept
    expert that receives none is not in the result (it stays as it is, bit for bit)."""
    groups: dict[int, list[int]] = {}
    for d, c in sorted(assignment.items()):
        if strength * float(mass[d]) > 0.0:
            groups.setdefault(c, []).append(d)
    rows: Rows = {}
    for c, ds in groups.items():
        weights = [float(mass[c])] + [strength * float(mass[d]) for d in ds]
        total = sum(weights)
        new = {}
        for name in ("gate_up_proj", "down_proj"):
            stored = getattr(experts, name)
            acc = sum(w * stored[e].double() for w, e in zip(weights, [c] + ds))
            new[name] = (acc / total).to(stored.dtype)
        rows[c] = new
    return rows


class MergeRepair:
    """Merges one layer's dropped experts into its kept ones (see the module docstring)."""

    def __init__(self, adapter: MoEAdapter, objective: str, chunk_tokens: int, ctx: Dist | None = None) -> None:
        self.adapter, self.objective, self.chunk = adapter, objective, max(1, chunk_tokens)
        self.ranks = RankSums(ctx)

    def run(self, stream: HiddenStates, layer: nn.Module, block: nn.Module, kept: list[int],
            inputs: torch.Tensor) -> tuple[dict, Rows]:
        """Merges in place (the kept experts' gate_up_proj and down_proj rows); returns (the report's
        entry, {kept expert: new rows}, empty when nothing changed or it was reverted)."""
        experts, num = block.experts, self.adapter.num_experts
        kept = sorted(kept)
        dropped = [e for e in range(num) if e not in kept]
        masked = MaskedForward(self.adapter, block, kept, chunk_tokens=self.chunk)
        stats = _Statistics(num, kept, dropped, experts.down_proj.device)
        before: dict[int, float] = {}
        for batch, _, x, z in block_io(stream, layer, block, inputs):
            before[batch] = before.get(batch, 0.0) + squared_error(masked, x, z)
            for lo in range(0, x.shape[0], self.chunk):
                stats.add(self.adapter, block, x[lo:lo + self.chunk])
        self.ranks.tensors(stats.mass, stats.dot, stats.norm_dropped, stats.norm_kept)
        before = self.ranks.per_batch(before)
        cosine = stats.cosine()
        assignment = {d: kept[int(torch.argmax(cosine[i]))] for i, d in enumerate(dropped)}
        loss_before = objective_loss(self.objective, before)
        entry = {
            "method": "merge", "loss_before": loss_before, "loss_after": loss_before, "strength": None,
            "loss_by_strength": {}, "into": {str(d): c for d, c in assignment.items()},
            "cosine": {str(d): float(cosine[i, kept.index(assignment[d])]) for i, d in enumerate(dropped)},
            "mass": {str(e): float(stats.mass[e]) for e in range(num)}, "reverted": False,
        }
        candidates = {s: merged_rows(experts, assignment, stats.mass, s) for s in STRENGTHS}
        candidates = {s: rows for s, rows in candidates.items() if rows}
        if not candidates:  # every dropped expert has zero weight: nothing to fold in
            return entry, {}
        losses = [self.ranks.per_batch(errs) for errs in layer_losses(stream, layer, block, inputs, masked, list(candidates.values()))]
        by_strength = {s: objective_loss(self.objective, errs) for s, errs in zip(candidates, losses)}
        best = min(by_strength, key=lambda s: (by_strength[s], s))
        entry.update(loss_after=by_strength[best], strength=best, loss_by_strength={str(s): v for s, v in by_strength.items()})
        return keep_if_lower(entry, experts, candidates[best])


class _Statistics:
    """Routing mass of every expert and the weighted output inner products of (dropped, kept) pairs."""

    def __init__(self, num: int, kept: list[int], dropped: list[int], device: torch.device) -> None:
        self.kept, self.dropped = kept, dropped
        self.mass = torch.zeros(num, dtype=torch.float64, device=device)
        self.dot = torch.zeros(len(dropped), len(kept), dtype=torch.float64, device=device)
        self.norm_dropped = torch.zeros(len(dropped), dtype=torch.float64, device=device)
        self.norm_kept = torch.zeros(len(dropped), len(kept), dtype=torch.float64, device=device)

    def add(self, adapter: MoEAdapter, block: nn.Module, x: torch.Tensor) -> None:
        logits = adapter.router_logits(block, x).float().contiguous()
        route = route_masked(logits, layer_routing(adapter, block))  # the unpruned routing
        ids, weights = route.ids.long(), route.weights.double()
        valid = (ids >= 0) & (ids < self.mass.numel())
        self.mass.index_add_(0, ids[valid], weights[valid])
        for i, d in enumerate(self.dropped):
            tok, slot = (ids == d).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            w = weights[tok, slot]
            xs = x[tok]
            od = adapter.expert_forward(block.experts, d, xs).double()
            self.norm_dropped[i] += (w * (od * od).sum(-1)).sum()
            for j, c in enumerate(self.kept):
                oc = adapter.expert_forward(block.experts, c, xs).double()
                self.dot[i, j] += (w * (od * oc).sum(-1)).sum()
                self.norm_kept[i, j] += (w * (oc * oc).sum(-1)).sum()

    def cosine(self) -> torch.Tensor:
        """[dropped, kept] cosine of the outputs on the dropped expert's tokens (0 where it has none)."""
        denom = (self.norm_dropped.unsqueeze(1) * self.norm_kept).sqrt()
        return torch.where(denom > 0, self.dot / denom.clamp_min(1e-300), torch.zeros_like(self.dot))
