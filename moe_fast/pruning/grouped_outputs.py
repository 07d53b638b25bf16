"""Expert outputs of a grouped router's layer (``topk_group < n_group``), computed as candidates need them.

Why not the rank-bounded statistics: with expert groups a candidate keep-set's experts depend on
the group scores over the experts it keeps, not on a prefix of each token's ranked row, so no
fixed number of ranked outputs per token covers every candidate. Instead every candidate routes
every token afresh (``layer_routing.route_candidates``), and a (token, expert) output is computed
once, the first time some candidate chooses it (the unpruned top-k come with the layer forward).
The outputs live in a pool indexed by a [T, E] map (-1: not computed), so memory follows the
outputs computed. The errors are summed in float64 (the specification is
``routing_runtime.grouped_subset_loss``).

Backward elimination scores a child (a frontier set plus one expert) against its parent's
per-token state: dropping an expert that is neither among a token's chosen experts nor at least
as good as the second best of its group changes neither a group score nor the chosen top-k, so
only the other tokens are routed again; the rest keep the parent's error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.routing import runtime as routing_runtime
from moe_fast.adapters import MoEAdapter
from moe_fast.routing.layer_routing import route_candidates
from moe_fast.pruning.block_recorder import BlockRecorder, RecordedChunk
from moe_fast.pruning.lazy_outputs import run_pairs
from moe_fast.kernels.routing_spec import RoutingSpec

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
        self.frontier: set[tuple[int, ...]] = set()  # backward elimination: the sets whose children come next
        self.states: dict[tuple[int, ...], _State] = {}  # their per-token states, built when first needed

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
        held += sum(_nbytes(st.ids) + _nbytes(st.err) + _nbytes(st.critical) for st in self.states.values())
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

    def _unpruned_errors(self, tok: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[n] float64: the unpruned routing's error (0 layer-wise: it is the target)."""
        if self.z is None:
            return torch.zeros(tok.shape[0], dtype=torch.float64, device=target.device)
        return ((self._routed(tok, self.ids[tok], self.w[tok]) - target) ** 2).sum(-1)

    def _step(self, num_candidates: int) -> int:
        """Tokens per chunk so that a chunk's gathered outputs and routing stay within GATHER_ELEMENTS."""
        H = self.pool.shape[1]
        return max(1, min(GATHER_ELEMENTS // max(1, num_candidates * self.k * H),
                          GATHER_ELEMENTS // max(1, num_candidates * self.num_experts)))

    def _errors_against(
        self, tok: torch.Tensor, keep: torch.Tensor, base_ids: torch.Tensor, base_err: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each candidate's routing and per-token error on tokens ``tok`` ([C, n, k] ids, [C, n] float64).

        A token a candidate routes exactly as the base (same experts, hence the same weights) keeps
        the base's error ``base_err`` [n]; only the other (candidate, token) pairs gather outputs."""
        ids, w = route_candidates(self.logits[tok], self.spec, keep)  # [C, n, k]
        err = base_err.unsqueeze(0).repeat(keep.shape[0], 1)
        c_idx, t_idx = torch.nonzero((ids != base_ids.unsqueeze(0)).any(-1), as_tuple=True)
        if c_idx.numel():
            p_ids = ids[c_idx, t_idx]
            self._ensure(tok[t_idx], p_ids)
            routed = self._routed(tok[t_idx], p_ids, w[c_idx, t_idx])
            err[c_idx, t_idx] = ((routed - self._target(tok[t_idx])) ** 2).sum(-1)
        return ids, err

    def group_errors(self, keep: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Squared errors [C, G] float64 of keep-sets [C, E] over this rank's tokens, computing the
        outputs their routing chooses and the pool lacks (``routing_runtime.grouped_subset_loss``).
        Tokens a candidate routes as the unpruned router keep the unpruned error."""
        C = keep.shape[0]
        out = torch.zeros(C, num_groups, dtype=torch.float64)
        T = self.num_tokens
        if T == 0 or C == 0:
            return out
        keep = keep.to(self.index.device)
        step = self._step(C)
        for lo in range(0, T, step):
            tok = torch.arange(lo, min(T, lo + step), device=self.index.device)
            base = self._unpruned_errors(tok, self._target(tok))
            _, err = self._errors_against(tok, keep, self.ids[tok], base)
            out.index_add_(1, self.group[tok].cpu(), err.cpu())
        return out

    # --- backward elimination: children scored against their parent's per-token state -----------
    def set_frontier(self, frontier: list[tuple[int, ...]]) -> None:
        """The dropped sets whose children the search scores next; their per-token states are built
        when first needed (``child_errors``) and those of earlier frontiers are freed."""
        self.frontier = set(frontier)
        self.states = {d: st for d, st in self.states.items() if d in self.frontier}

    def parent_in_frontier(self, dropped: tuple[int, ...]) -> tuple[tuple[int, ...], int] | None:
        """(parent, added expert) for a dropped set one expert beyond a frontier set, else None."""
        for e in dropped:
            parent = tuple(x for x in dropped if x != e)
            if parent in self.frontier:
                return parent, e
        return None

    def _state(self, dropped: tuple[int, ...]) -> _State:
        if dropped not in self.states:
            T, E = self.num_tokens, self.num_experts
            keep = torch.ones(1, E, dtype=torch.bool, device=self.index.device)
            keep[0, list(dropped)] = False
            ids = torch.empty(T, self.k, dtype=torch.int64, device=self.index.device)
            err = torch.empty(T, dtype=torch.float64, device=self.index.device)
            step = self._step(1)
            for lo in range(0, T, step):
                tok = torch.arange(lo, min(T, lo + step), device=self.index.device)
                base = self._unpruned_errors(tok, self._target(tok))
                got, e = self._errors_against(tok, keep, self.ids[tok], base)
                ids[tok], err[tok] = got[0], e[0]
            self.states[dropped] = _State(ids, err, self._critical(keep[0], ids))
            self._track()
        return self.states[dropped]

    def _critical(self, keep: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[T, E] bool: per token, the experts whose drop can change its routing under ``keep``: the
        chosen ones and, per group, those at least as good as the group's second best allowed one
        (the group score is the sum of the two best). Dropping any other expert changes neither a
        group score nor the top-k among the eligible groups."""
        T, E = self.num_tokens, self.num_experts
        G = self.spec.n_group
        critical = torch.zeros(T, E, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)
        step = max(1, GATHER_ELEMENTS // max(1, E))
        for lo in range(0, T, step):
            hi = min(T, lo + step)
            choice = routing_runtime.sigmoid_choice(self.logits[lo:hi], self.spec)[1].masked_fill(~keep, -math.inf)
            grouped = choice.view(hi - lo, G, E // G)
            second = torch.topk(grouped, min(2, E // G), dim=-1).values[..., -1:]  # [n, G, 1]
            critical[lo:hi] |= (grouped >= second).reshape(hi - lo, E) & keep
        return critical

    def child_errors(self, parent: tuple[int, ...], expert: int, num_groups: int) -> torch.Tensor:
        """Squared errors [G] float64 of ``parent`` plus ``expert`` dropped: only the tokens whose
        routing the drop can change (``_critical``) are routed again; the others keep the parent's error."""
        st = self._state(parent)
        keep = torch.ones(1, self.num_experts, dtype=torch.bool, device=self.index.device)
        keep[0, list(parent) + [expert]] = False
        err = st.err.clone()
        affected = torch.nonzero(st.critical[:, expert]).squeeze(1)
        step = self._step(1)
        for lo in range(0, affected.shape[0], step):
            tok = affected[lo : lo + step]
            _, e = self._errors_against(tok, keep, st.ids[tok], st.err[tok])
            err[tok] = e[0]
        return torch.zeros(num_groups, dtype=torch.float64).index_add_(0, self.group.cpu(), err.cpu())


@dataclass
class _State:
    """A frontier set's per-token routing (ids [T, k]), error [T] float64 and critical experts [T, E]."""

    ids: torch.Tensor
    err: torch.Tensor
    critical: torch.Tensor


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
