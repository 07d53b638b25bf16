"""Expert outputs of a grouped router's layer (``topk_group < n_group``), computed as candidates need them.

Why not the rank-bounded statistics: with expert groups a candidate keep-set's experts depend on
the group scores over the experts it keeps, not on a prefix of each token's ranked row, so no
fixed number of ranked outputs per token covers every candidate. Instead every candidate routes
every token afresh (``layer_routing.route_candidates``), and a (token, expert) output is computed
once, the first time some candidate chooses it (the unpruned top-k come with the layer forward).
The outputs live in a pool indexed by a [T, E] map (-1: not computed), so memory follows the
outputs computed. The errors are summed in float64 (the specification is
``reference.grouped_subset_loss``).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_fast.adapters import MoEAdapter
from moe_fast.layer_routing import route_candidates
from moe_fast.pruning.block_recorder import BlockRecorder, RecordedChunk
from moe_fast.pruning.lazy_outputs import run_pairs
from moe_fast.routing_spec import RoutingSpec

GATHER_ELEMENTS = 1 << 23  # float64 elements of one gathered [C, n, k, H] block (64 MiB)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class GroupedOutputs:
    """One layer's calibration tokens (this rank's) and the expert outputs computed so far."""

    def __init__(self, adapter: MoEAdapter, experts: nn.Module, spec: RoutingSpec) -> None:
        self.adapter, self.experts, self.spec = adapter, experts, spec
        self.num_experts, self.k = adapter.num_experts, spec.top_k
        self._chunks: dict[str, list[torch.Tensor]] = {n: [] for n in ("x", "logits", "group", "ids", "w", "y", "z")}
        self.num_tokens = 0
        self.num_groups = 0  # batches seen on this rank (set by the recorder)
        self.num_groups_total = 0  # batches of the objective over all ranks (set before scoring)
        self.size = 0  # outputs in the pool
        self.peak_bytes = 0

    def add_chunk(self, x, logits, group, ids, w, y, z=None) -> None:
        """A chunk of n tokens: inputs [n, H], logits [n, E], batch [n], unpruned top-k ids [n, k]
        and weights [n, k] with their outputs [n, k, H], progressive target [n, H] or None."""
        for name, v in (("x", x), ("logits", logits), ("group", group), ("ids", ids.long()), ("w", w), ("y", y), ("z", z)):
            if v is not None:
                self._chunks[name].append(v)
        self.num_tokens += x.shape[0]

    def finish(self) -> None:
        """Joins the chunks and puts the unpruned top-k outputs into the pool."""
        cat = lambda parts: torch.cat(parts).contiguous() if parts else None  # noqa: E731
        self.x, self.logits, self.group, self.ids, self.w, y, self.z = (
            cat(self._chunks[n]) for n in ("x", "logits", "group", "ids", "w", "y", "z")
        )
        self._chunks = {}
        T, E, k = self.num_tokens, self.num_experts, self.k
        device = self.logits.device if self.logits is not None else torch.device("cpu")
        self.index = torch.full((T, E), -1, dtype=torch.int64, device=device)
        self.num_groups_total = max(self.num_groups_total, self.num_groups)
        if T == 0:
            self.pool = torch.empty(0, 0)
            return
        self.pool = y.reshape(T * k, -1)
        self.size = T * k
        self.index.scatter_(1, self.ids, torch.arange(T * k, device=device).view(T, k))
        self._track()

    @property
    def outputs_per_token(self) -> float:
        """(token, expert) outputs computed per calibration token, the unpruned top-k included."""
        return self.size / max(1, self.num_tokens)

    def _track(self) -> None:
        held = sum(_nbytes(t) for t in (self.pool, self.index, self.x, self.logits, self.group, self.ids, self.w, self.z))
        self.peak_bytes = max(self.peak_bytes, held)

    def _append(self, new: torch.Tensor) -> torch.Tensor:
        """Adds outputs [n, H] to the pool (capacity doubles when full); returns their positions."""
        n = new.shape[0]
        if self.size + n > self.pool.shape[0]:
            grown = self.pool.new_empty(max(2 * self.pool.shape[0], self.size + n), self.pool.shape[1])
            grown[: self.size] = self.pool[: self.size]
            self.pool = grown
        self.pool[self.size : self.size + n] = new
        pos = torch.arange(self.size, self.size + n, device=self.index.device)
        self.size += n
        self._track()
        return pos

    def _ensure(self, tok: torch.Tensor, ids: torch.Tensor) -> None:
        """Computes the outputs of (tok[p], ids[p, j]) the pool lacks (tok [P] token indices, ids [P, k])."""
        n = tok.shape[0]
        if n == 0:
            return
        rows = tok.repeat_interleave(ids.shape[1])
        cols = ids.reshape(-1)
        missing = self.index[rows, cols] < 0
        if not bool(missing.any()):
            return
        pairs = torch.unique(rows[missing] * self.num_experts + cols[missing])  # each pair once
        rows, cols = pairs // self.num_experts, pairs % self.num_experts
        new = run_pairs(self.adapter, self.experts, self.x, rows, cols)
        self.index[rows, cols] = self._append(new)

    def _routed(self, tok: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_j w[p, j] * output(tok[p], ids[p, j]) in float64: tok [P], ids, w [P, k] -> [P, H]."""
        pos = torch.gather(self.index[tok], 1, ids)
        return torch.einsum("pk,pkh->ph", w.double(), self.pool[pos].double())

    def _target(self, tok: torch.Tensor) -> torch.Tensor:
        """[n, H] float64: the unpruned routed output (layer-wise) or the progressive target."""
        return self._routed(tok, self.ids[tok], self.w[tok]) if self.z is None else self.z[tok].double()

    def group_errors(self, keep: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Squared errors [C, G] float64 of keep-sets [C, E] over this rank's tokens, computing the
        outputs their routing chooses and the pool lacks (``reference.grouped_subset_loss``).

        A token a candidate routes exactly as the unpruned router (same experts, hence the same
        weights) has the unpruned error: 0 layer-wise, the unpruned output's distance to the
        target progressive. Only the other (candidate, token) pairs gather outputs."""
        C, k = keep.shape[0], self.k
        out = torch.zeros(C, num_groups, dtype=torch.float64)
        T = self.num_tokens
        if T == 0 or C == 0:
            return out
        H = self.pool.shape[1]
        keep = keep.to(self.index.device)
        step = max(1, min(GATHER_ELEMENTS // max(1, C * k * H), GATHER_ELEMENTS // max(1, C * self.num_experts)))
        for lo in range(0, T, step):
            tok = torch.arange(lo, min(T, lo + step), device=self.index.device)
            ids, w = route_candidates(self.logits[tok], self.spec, keep)  # [C, n, k]
            target = self._target(tok)
            if self.z is None:
                err = torch.zeros(C, tok.shape[0], dtype=torch.float64, device=target.device)
            else:
                base = self._routed(tok, self.ids[tok], self.w[tok])
                err = ((base - target) ** 2).sum(-1).unsqueeze(0).repeat(C, 1)
            c_idx, t_idx = torch.nonzero((ids != self.ids[tok].unsqueeze(0)).any(-1), as_tuple=True)
            if c_idx.numel():
                p_ids = ids[c_idx, t_idx]
                self._ensure(tok[t_idx], p_ids)
                routed = self._routed(tok[t_idx], p_ids, w[c_idx, t_idx])
                err[c_idx, t_idx] = ((routed - target[t_idx]) ** 2).sum(-1)
            out.index_add_(1, self.group[tok].cpu(), err.cpu())
        return out


class GroupedRecorder(BlockRecorder):
    """Records a grouped layer's tokens: each token's unpruned top-k run with the layer forward."""

    def ranked_outputs(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep_all = torch.ones(1, logits.shape[1], dtype=torch.bool, device=logits.device)
        ids = route_candidates(logits, self.routing, keep_all)[0][0]  # [n, k]
        n = x.shape[0]
        rows = torch.arange(n, device=x.device).repeat_interleave(ids.shape[1])
        y = run_pairs(self.adapter, self.block.experts, x, rows, ids.reshape(-1)).view(n, ids.shape[1], -1)
        return ids.to(torch.int32), y

    def keep(self, chunk: RecordedChunk) -> None:
        c = chunk
        self.store.add_chunk(c.x, c.logits, c.group, c.ranked, c.weights, c.outputs, z=c.target)
