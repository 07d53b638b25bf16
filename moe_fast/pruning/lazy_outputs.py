"""Lazy expert outputs: each (token, expert) output is computed only when a candidate needs it.

The rank-bounded search (``expert_outputs.StatsForward``) runs every calibration token's
M = k + dropped highest-ranked experts up front. Here a token starts with its k + 1 first ranks
(``LazyRecorder``, during the layer forward that is needed anyway) and is extended rank by rank
when a candidate's top-k among its kept experts reaches past what is computed
(``LazyOutputs.extend``). The searches in ``moe_fast.pruning.lazy_search`` decide which tokens
need what.

Storage follows the outputs computed: tokens are kept in buckets by their computed depth d, each
with the d outputs (needed for the Gram entries of later ranks) and the d(d+1)/2 Gram entries.
A token that is extended leaves its piece as a dead row (``_Part.alive``) rather than having the
piece copied without it; a piece is compacted when half its rows are dead.
Lean mode (``hold_outputs=False``: ``moe_fast.prune(..., recompute_outputs=...)``) holds no
outputs: a token keeps its block input x and its Gram entries; extending it from d to nd ranks
recomputes its outputs of the ranks [0, d) still needed (all but those of dead experts, and
layer-wise always the target's first k), computes the new ranks, forms the entries with the new
ranks and drops the outputs again (in dispatches of at most ``LEAN_DISPATCH`` outputs). The
earlier ranks' entries are kept as first computed. Each depth's entries are one piece (merged
after each extension), read in place by ``lean_entries`` rather than through the flat copy, which
would double the Gram entries held. Recomputed outputs count in
``outputs_computed``; more first ranks and a ``lookahead`` past the need make extensions rarer.
Scoring reuses ``ops.subset_loss``. Greedy and beam with renormalized weights gather each token's
few Gram entries they need from one flat copy of all tokens' entries (``flat_entries``, rebuilt
after each ``extend``; ``lazy_children``). Otherwise a bucket is handed to the op with its ids padded
to the width the op's rank-bound check asks for (k + dropped) and zero Gram entries there, which
a covered token never reaches (its top-k among the kept lies within its d computed ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.kernels import ops
from moe_fast.routing import runtime as routing_runtime
from moe_fast.adapters import MoEAdapter
from moe_fast.pruning.block_recorder import BlockRecorder, RecordedChunk


def ranking(logits: torch.Tensor, m: int) -> torch.Tensor:
    """Each token's m highest-ranked experts [T, m] int32, in routing order (ties: lower index)."""
    if m <= 8:
        return ops.route(logits, m).ids
    order, _ = routing_runtime.rank_experts(logits)
    return order[:, :m].to(torch.int32).contiguous()


def kth_kept_depth(order: torch.Tensor, dropped: torch.Tensor, j: int) -> torch.Tensor:
    """Per token, how many ranks hold its j-th expert outside ``dropped`` ([T] int64).

    order [T, M] ranked experts, dropped [C, E] or [E] bool. Tokens whose first M ranks keep
    fewer than j experts get M + 1 (more than can be computed: never covered).
    """
    kept = ~dropped[..., order.long()]  # [..., T, M]
    count = torch.cumsum(kept.to(torch.int32), dim=-1)
    reached = count >= j
    depth = torch.argmax(reached.to(torch.int8), dim=-1) + 1
    return torch.where(reached.any(-1), depth, torch.full_like(depth, order.shape[1] + 1))


def run_pairs(adapter: MoEAdapter, experts: nn.Module, x: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Outputs [P, H] of expert ids[p] on x[rows[p]] (one batched call per expert, rows ascending)."""
    out = x.new_empty(rows.shape[0], x.shape[1])
    if rows.numel() == 0:
        return out
    ids = ids.long()
    perm = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=adapter.num_experts).tolist()
    lo = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = perm[lo : lo + n]
        out[sel] = adapter.expert_forward(experts, e, x[rows[sel]]).to(out.dtype)
        lo += n
    return out


def _pack_index(d: int, m: int, device: torch.device) -> torch.Tensor:
    """Positions of the packed d x d upper triangle inside the packed m x m one (m >= d)."""
    rows, cols = routing_runtime.triu_pairs(d)
    start = rows * m - rows * (rows - 1) // 2  # gram_index(i, i, m)
    return (start + cols - rows).to(device)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


MAX_PARTS = 8  # pieces per depth bucket before they are concatenated
LEAN_DISPATCH = 1 << 15  # lean mode: most (token, expert) outputs recomputed and alive at once


@dataclass
class _Part:
    tok: torch.Tensor  # [n] int64 token indices
    y: torch.Tensor | None  # [n, L, H] outputs of the ranks in `slot` (None: a merged view for scoring)
    gram: torch.Tensor  # [n, d(d+1)/2] float32: all d first ranks (0 for a rank not computed)
    cross: torch.Tensor | None  # [n, d] float32 (progressive; 0 for a rank not computed)
    alive: torch.Tensor | None = None  # [n] bool: rows still this part's (None: all); a row whose
    # token moved to a deeper bucket stays until the part is compacted (moving is then O(moved))
    slot: torch.Tensor | None = None  # [n, L] int64 ascending rank positions of y's outputs (None:
    # all d first ranks); ranks of experts that no search set can keep any more are not computed

    def rows(self, idx: torch.Tensor) -> "_Part":
        """The given rows (all alive)."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return _Part(self.tok[idx], pick(self.y), self.gram[idx], pick(self.cross), None, pick(self.slot))

    def live(self) -> "_Part":
        """The part without its dead rows (itself when all are alive)."""
        return self if self.alive is None else self.rows(torch.nonzero(self.alive).squeeze(1))

    def live_rows(self) -> torch.Tensor:
        """Indices [n'] of the alive rows."""
        if self.alive is None:
            return torch.arange(self.tok.shape[0], device=self.tok.device)
        return torch.nonzero(self.alive).squeeze(1)

    def slots(self) -> torch.Tensor:
        """[n, L] rank positions of y's outputs."""
        if self.slot is not None:
            return self.slot
        return torch.arange(self.y.shape[1], device=self.tok.device).expand(self.tok.shape[0], -1)


def _merge(parts: list[_Part], outputs: bool = True) -> _Part:
    """One piece of the alive rows of several of the same depth (without the outputs when
    ``outputs`` is False; with them, all must hold as many outputs)."""
    if len(parts) == 1 and parts[0].alive is None:
        return parts[0] if outputs else _Part(parts[0].tok, None, parts[0].gram, parts[0].cross)
    if not outputs:  # only the small tensors are copied
        parts = [_Part(p.tok, None, p.gram, p.cross, p.alive) for p in parts]
    parts = [p.live() for p in parts]
    cross = None if parts[0].cross is None else torch.cat([p.cross for p in parts])
    y = torch.cat([p.y for p in parts]) if outputs else None
    slot = None
    if outputs and any(p.slot is not None for p in parts):
        slot = torch.cat([p.slots() for p in parts])
    return _Part(torch.cat([p.tok for p in parts]), y, torch.cat([p.gram for p in parts]), cross, None, slot)


def _depth_of(p: _Part) -> int:
    """The ranks a piece's Gram entries cover (d from its d(d+1)/2 entries per token)."""
    d = int(((8 * p.gram.shape[1] + 1) ** 0.5 - 1) / 2 + 0.5)
    if d * (d + 1) // 2 != p.gram.shape[1]:
        raise ValueError(f"{p.gram.shape[1]} Gram entries per token are no packed triangle")
    return d


def _merge_bucket(parts: list[_Part]) -> list[_Part]:
    """Pieces of one depth merged per number of outputs held (only those can share a tensor)."""
    if all(p.y is None for p in parts):  # lean mode: no outputs held
        return [_merge(parts, outputs=False)]
    by_width: dict[int, list[_Part]] = {}
    for p in parts:
        by_width.setdefault(p.y.shape[1], []).append(p)
    return [_merge(ps) if len(ps) > 1 else ps[0] for ps in by_width.values()]


class LazyOutputs:
    """One layer's calibration tokens, their computed ranks, outputs and Gram entries."""

    def __init__(self, adapter: MoEAdapter, experts: nn.Module, rank_bound: int, hold_outputs: bool = True,
                 lookahead: int = 0) -> None:
        """``hold_outputs`` False (lean): a token keeps only its Gram entries; extending it recomputes
        the outputs of its earlier ranks that are still needed (counted in ``outputs_computed``).
        ``lookahead``: ranks computed past what a token needs when it is extended (fewer extensions)."""
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.hold_outputs, self.lookahead = hold_outputs, lookahead
        self.adapter, self.experts = adapter, experts
        self.k, self.num_experts, self.rank_bound = adapter.top_k, adapter.num_experts, rank_bound
        self.renormalize = adapter.renormalize
        self._chunks: dict[str, list[torch.Tensor]] = {n: [] for n in ("x", "logits", "order", "group", "tw", "z", "tsq")}
        self._parts: list[_Part] = []
        self.buckets: dict[int, list[_Part]] = {}
        self.num_tokens = 0
        self.num_groups = 0
        self.first_ranks = self.k + 1  # ranks every token starts with (LazyRecorder)
        self.num_groups_total = 0  # groups of the objective (all ranks' batches); set by finish()
        self.num_tokens_total = 0  # tokens of all ranks (the exhaustive search's estimates)
        self.outputs_computed = 0  # (token, expert) outputs run so far, initial ranks and recomputed ones included
        self.outputs_recomputed = 0  # lean mode: of those, outputs run again for a token's earlier ranks
        self.peak_bytes = 0  # most bytes held by outputs and Gram entries at once
        self._flat = None  # flat_entries(), until the next extend

    # --- filled by LazyRecorder ----------------------------------------------------------------
    def add_chunk(self, x, logits, order, group, y, gram, tw=None, z=None, cross=None, tsq=None) -> None:
        n = x.shape[0]
        tok = torch.arange(self.num_tokens, self.num_tokens + n, device=x.device)
        for name, v in (("x", x), ("logits", logits), ("order", order), ("group", group), ("tw", tw), ("z", z), ("tsq", tsq)):
            if v is not None:
                self._chunks[name].append(v)
        self._parts.append(_Part(tok, y if self.hold_outputs else None, gram, cross))
        self.num_tokens += n
        self.outputs_computed += n * y.shape[1]
        self._track()

    def finish(self) -> None:
        cat = lambda parts: torch.cat(parts).contiguous() if parts else None  # noqa: E731
        self.x, self.logits, self.order, self.group = (cat(self._chunks[n]) for n in ("x", "logits", "order", "group"))
        self.tw, self.z, self.tsq = (cat(self._chunks[n]) for n in ("tw", "z", "tsq"))
        self._chunks = {}
        self.num_groups_total = max(self.num_groups_total, self.num_groups)
        self.num_tokens_total = max(self.num_tokens_total, self.num_tokens)
        self.progressive = self.z is not None
        device = self.order.device if self.order is not None else torch.device("cpu")
        self.depth = torch.zeros(self.num_tokens, dtype=torch.int64, device=device)
        for p in self._parts:
            d = _depth_of(p)
            self.buckets.setdefault(d, []).append(p)
            self.depth[p.tok] = d
        self._parts = []
        self.row = torch.zeros_like(self.depth)  # lean: each token's row in its depth's single piece
        if not self.hold_outputs:
            self._one_piece_per_depth(list(self.buckets))

    # --- growth --------------------------------------------------------------------------------
    def extend(self, need: torch.Tensor, dead: torch.Tensor | None = None) -> int:
        """Computes further ranks so that token t holds at least min(need[t], rank_bound); returns
        the number of new (token, expert) outputs.

        ``dead`` [E] bool (greedy and beam: the experts every search set drops, so that no later
        set keeps them): their ranks are not computed (zero Gram entries, never read for a set
        that drops them). The exhaustive search passes none.
        """
        need = need.to(self.depth.device)
        if self.lookahead:  # tokens that grow at all grow past the need
            need = torch.where(need > self.depth, need + self.lookahead, need)
        need = need.clamp(max=self.rank_bound)
        if not bool((need > self.depth).any()):
            return 0
        self._flat = None
        moves = []  # (old depth, new depth, rows of the old part's tensors, the part)
        growing = set(torch.unique(self.depth[need > self.depth]).tolist())  # depths with tokens to extend
        for d in sorted(growing & set(self.buckets)):
            kept_parts = []
            for p in self.buckets[d]:
                target = need[p.tok]
                grow = target > d
                if p.alive is not None:
                    grow &= p.alive
                if not bool(grow.any()):
                    kept_parts.append(p)
                    continue
                idx = torch.nonzero(grow).squeeze(1)
                for nd in torch.unique(target[idx]).tolist():
                    sel = idx[target[idx] == nd]
                    moves.append((d, int(nd), sel, p))
                alive = ~grow if p.alive is None else p.alive & ~grow
                count = int(alive.sum())
                if count == 0:
                    continue
                rest = _Part(p.tok, p.y, p.gram, p.cross, alive, p.slot)
                # Compact when at most half the rows are alive (the moved rows are read below
                # from p, which keeps its tensors).
                # Lean pieces (no outputs) are compacted at once: a copy of their Gram entries only.
                kept_parts.append(rest.live() if 2 * count <= p.tok.shape[0] or p.y is None else rest)
            self.buckets[d] = kept_parts
        # All new (token, rank) pairs in one dispatch, grouped move by move (lean: in dispatches of
        # at most LEAN_DISPATCH outputs, so that the recomputed outputs alive at once stay bounded).
        cap = None if self.hold_outputs else LEAN_DISPATCH
        batches: list[list[tuple]] = [[]]  # per dispatch: (d, nd, sel, p, pos, rows, ids)
        held = total = 0
        for d, nd, sel, p in moves:
            tok = p.tok[sel]
            # Lean: the outputs of the earlier ranks [0, d) are recomputed too, but the dead ones'
            # (their entries with later ranks are never read) outside the layer-wise target's first k.
            lo_rank = d if self.hold_outputs else 0
            r = self.order[tok, lo_rank:nd].long()  # [n, nd - lo_rank]
            run = torch.ones_like(r, dtype=torch.bool) if dead is None else ~dead.to(r.device)[r]
            if not self.hold_outputs and not self.progressive:
                run[:, : self.k] = True
            count = run.sum(1)
            for c in torch.unique(count).tolist():  # one new piece per number of new outputs
                these_all = torch.nonzero(count == c).squeeze(1)
                step = these_all.shape[0] if cap is None else max(1, cap // max(1, c))
                for a in range(0, these_all.shape[0], step):
                    these = these_all[a : a + step]
                    pos = torch.nonzero(run[these])[:, 1].view(these.shape[0], c) + lo_rank  # rank positions run
                    t = tok[these]
                    if cap is not None and held and held + t.shape[0] * c > cap:
                        batches.append([])
                        held = 0
                    batches[-1].append((d, nd, sel[these], p, pos, t.unsqueeze(1).expand(-1, c).reshape(-1),
                                        self.order[t.unsqueeze(1), pos].reshape(-1)))
                    held += t.shape[0] * c
                    total += t.shape[0] * c
        recomputed = 0
        for plans in batches:
            if not plans:
                continue
            new = run_pairs(self.adapter, self.experts, self.x, torch.cat([q[5] for q in plans]), torch.cat([q[6] for q in plans]))
            lo = 0
            for d, nd, sel, p, pos, _, _ in plans:
                n, c = pos.shape
                y_new = new[lo : lo + n * c].view(n, c, new.shape[1])
                lo += n * c
                if self.hold_outputs:
                    self._grow_holding(d, nd, sel, p, pos, y_new)
                else:
                    recomputed += int((pos < d).sum())
                    self._grow_lean(d, nd, sel, p, pos, y_new)
            del new
        if not self.hold_outputs:
            self._one_piece_per_depth([d for d, ps in self.buckets.items() if len(ps) != 1 or ps[0].alive is not None])
        for d, parts in self.buckets.items():  # bound the number of pieces (one copy now and then)
            if len(parts) > MAX_PARTS:
                self.buckets[d] = _merge_bucket(parts)
        self.depth = torch.maximum(self.depth, need)
        self.outputs_computed += total
        self.outputs_recomputed += recomputed
        self._track()
        return total

    def _grow_holding(self, d: int, nd: int, sel: torch.Tensor, p: _Part, pos: torch.Tensor, y_new: torch.Tensor) -> None:
        """The rows ``sel`` of piece p (depth d), with new outputs y_new at rank positions pos, as a
        piece of depth nd holding all their outputs."""
        tok = p.tok[sel]
        z = self.z[tok].contiguous() if self.progressive else None
        y = torch.cat([p.y[sel], y_new], dim=1).contiguous()
        if p.slot is None and pos.shape[1] == nd - d:  # all ranks held: the packed triangle directly
            gram, cross, _ = ops.expert_gram(y, z)
            slot = None
        else:
            slot = torch.cat([p.slots()[sel], pos], dim=1)
            gram, cross = self._scatter_gram(y, z, slot, nd)
        self.buckets.setdefault(nd, []).append(_Part(tok, y, gram, cross if self.progressive else None, None, slot))

    def _grow_lean(self, d: int, nd: int, sel: torch.Tensor, p: _Part, pos: torch.Tensor, y: torch.Tensor) -> None:
        """Lean: the rows ``sel`` of piece p (depth d) as a piece of depth nd without outputs; y holds
        the outputs at rank positions pos (earlier ranks recomputed, then the new ones)."""
        tok = p.tok[sel]
        z = self.z[tok].contiguous() if self.progressive else None
        gram, cross = self._scatter_gram(y, z, pos, nd)
        gram[:, _pack_index(d, nd, gram.device)] = p.gram[sel]  # the earlier ranks' entries as first computed
        if self.progressive:
            cross[:, :d] = p.cross[sel]
        self.buckets.setdefault(nd, []).append(_Part(tok, None, gram, cross if self.progressive else None))

    def _one_piece_per_depth(self, depths: list[int]) -> None:
        """Lean: the given depths' pieces merged into one each (a copy of that depth's Gram entries
        only), and ``row`` updated, so that scoring reads the pieces in place (``lean_entries``)
        instead of a flat copy of all entries."""
        for d in depths:
            parts = self.buckets[d]
            if not parts:
                del self.buckets[d]
                continue
            self.buckets[d] = [_merge(parts, outputs=False)]
        for ps in self.buckets.values():  # compacted pieces moved their rows too
            self.row[ps[0].tok] = torch.arange(ps[0].tok.shape[0], device=ps[0].tok.device)

    def lean_entries(self, tokens: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Lean: Gram entries (lo, hi) [n, P] of tokens [n] (lo <= hi < the token's depth; lo < 0:
        0), read from each depth's piece."""
        out = torch.zeros(lo.shape, dtype=torch.float32, device=lo.device)
        depth = self.depth[tokens]
        for d in torch.unique(depth).tolist():
            sel = torch.nonzero(depth == d).squeeze(1)
            a, b = lo[sel], hi[sel]
            idx = (self.row[tokens[sel]] * (d * (d + 1) // 2)).unsqueeze(1) + a * d - ((a * (a + 1)) >> 1) + b
            gram = self.buckets[d][0].gram.reshape(-1)
            out[sel] = torch.where(a >= 0, gram[idx.clamp_min(0)], torch.zeros((), dtype=gram.dtype, device=gram.device))
        return out

    def lean_cross(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Lean, progressive: cross products [n, W] of tokens [n] at slots (-1: 0)."""
        out = torch.zeros(slots.shape, dtype=torch.float32, device=slots.device)
        depth = self.depth[tokens]
        for d in torch.unique(depth).tolist():
            sel = torch.nonzero(depth == d).squeeze(1)
            s = slots[sel]
            cross = self.buckets[d][0].cross.reshape(-1)
            idx = (self.row[tokens[sel]] * d).unsqueeze(1) + s
            out[sel] = torch.where(s >= 0, cross[idx.clamp_min(0)], torch.zeros((), dtype=cross.dtype, device=cross.device))
        return out

    @staticmethod
    def _scatter_gram(y: torch.Tensor, z: torch.Tensor | None, slot: torch.Tensor, d: int):
        """Gram entries (and cross products) of outputs y [n, L, H] at rank positions slot [n, L],
        placed in the packed d x d triangle of all first d ranks (zeros elsewhere)."""
        n, L = slot.shape
        g, cross, _ = ops.expert_gram(y, z)
        ia, ib = routing_runtime.triu_pairs(L)
        a, b = slot[:, ia.to(slot.device)], slot[:, ib.to(slot.device)]  # ascending slots: a <= b
        gram = g.new_zeros(n, d * (d + 1) // 2).scatter_(1, a * d - a * (a - 1) // 2 + b - a, g)
        full_cross = None if z is None else g.new_zeros(n, d).scatter_(1, slot, cross)
        return gram, full_cross

    def _track(self) -> None:
        """Updates peak_bytes: outputs, Gram and cross products held, plus the per-token inputs
        (block inputs, logits, ranking, group, target)."""
        parts = self._parts + [p for ps in self.buckets.values() for p in ps]
        held = sum(_nbytes(p.y) + _nbytes(p.gram) + _nbytes(p.cross) for p in parts)
        if self._flat is not None:  # the flat copy of the Gram entries (and cross products)
            held += _nbytes(self._flat[0]) + _nbytes(self._flat[1]) + sum(_nbytes(t) for t in self._flat[2] or ())
        if self._chunks:
            held += sum(_nbytes(v) for vs in self._chunks.values() for v in vs)
        else:
            held += sum(_nbytes(v) for v in (self.x, self.logits, self.order, self.group, self.tw, self.z, self.tsq))
        self.peak_bytes = max(self.peak_bytes, held)

    @property
    def outputs_per_token(self) -> float:
        return self.outputs_computed / max(1, self.num_tokens)

    def flat_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """All tokens' Gram entries in one flat vector ending in a 0 (token t's packed d x d
        triangle from gram_start[t]), their cross products likewise (progressive; from cross_start
        = t's first rank's position), and gram_start. Cached until the next ``extend``; a copy of
        the Gram entries (d(d+1)/2 floats per token), so built on demand only."""
        if self._flat is None:
            device = self.depth.device
            grams, crosses = [], []
            start = torch.zeros(self.num_tokens, dtype=torch.int64, device=device)
            cstart = torch.zeros_like(start)
            offset = coffset = 0
            for d in sorted(self.buckets):
                for p in self.buckets[d]:  # dead rows are copied too (and never read)
                    rows = p.live_rows()
                    start[p.tok[rows]] = offset + rows * (d * (d + 1) // 2)
                    grams.append(p.gram.reshape(-1))
                    offset += grams[-1].numel()
                    if p.cross is not None:
                        cstart[p.tok[rows]] = coffset + rows * d
                        crosses.append(p.cross.reshape(-1))
                        coffset += crosses[-1].numel()
            flat = torch.cat(grams + [torch.zeros(1, device=device)])
            cross = (torch.cat(crosses + [torch.zeros(1, device=device)]), cstart) if self.progressive else None
            self._flat = (flat, start, cross)
            self._track()
        flat, start, cross = self._flat
        return flat, start, None if cross is None else cross[0], None if cross is None else cross[1]

    # --- scoring -------------------------------------------------------------------------------
    def _calls(self, tokens_mask: torch.Tensor | None, width: int, chunk: int):
        """Yields (tok, subset_loss inputs) for the selected tokens, bucket by bucket, padded to
        ``width`` ranked slots (at least each bucket's depth)."""
        for d in sorted(self.buckets):
            if not self.buckets[d]:
                continue
            for p in [_merge(self.buckets[d], outputs=False)]:
                sel = None if tokens_mask is None else tokens_mask[p.tok]
                if sel is not None and not bool(sel.any()):
                    continue
                tok_all = p.tok if sel is None else p.tok[sel]
                gram_all = p.gram if sel is None else p.gram[sel]
                cross_all = None if p.cross is None else (p.cross if sel is None else p.cross[sel])
                m = min(self.rank_bound, max(width, d))
                pack = _pack_index(d, m, gram_all.device)
                for lo in range(0, tok_all.shape[0], chunk):
                    tok = tok_all[lo : lo + chunk]
                    n = tok.shape[0]
                    gram = gram_all.new_zeros(n, m * (m + 1) // 2)
                    gram[:, pack] = gram_all[lo : lo + chunk]
                    args = {"gram": gram, "ids": self.order[tok, :m].contiguous(), "logits": self.logits[tok].contiguous()}
                    if self.progressive:
                        cross = gram_all.new_zeros(n, m)
                        cross[:, :d] = cross_all[lo : lo + chunk]
                        args.update(cross=cross, target_sq=self.tsq[tok].contiguous())
                    else:
                        tw = gram_all.new_zeros(n, m)
                        tw[:, : self.k] = self.tw[tok]
                        args.update(target_weights=tw)
                    yield tok, args

    def group_errors(self, keep_mask: torch.Tensor, num_groups: int, chunk: int = 4096) -> torch.Tensor:
        """Squared errors [C, G] of keep-sets [C, E] over all tokens; every token must be covered."""
        drops = int((~keep_mask).sum(1).max()) if keep_mask.shape[0] else 0
        out = torch.zeros(keep_mask.shape[0], num_groups, dtype=torch.float64)
        keep_mask = keep_mask.to(self.order.device)
        for tok, a in self._calls(None, self.k + drops, chunk):
            out += ops.subset_loss(a["gram"], a["ids"], a["logits"], keep_mask, self.group[tok].contiguous(), num_groups,
                                   self.k, self.renormalize, target_weights=a.get("target_weights"),
                                   cross=a.get("cross"), target_sq=a.get("target_sq")).cpu()
        return out

    def token_errors(self, keep_mask: torch.Tensor, tokens_mask: torch.Tensor, chunk: int = 4096):
        """Yields (tok [n], errors [C, n] float64) for the selected tokens, whether covered or not
        (an uncovered token's value is meaningless: the caller masks it)."""
        drops = int((~keep_mask).sum(1).max()) if keep_mask.shape[0] else 0
        keep_mask = keep_mask.to(self.order.device)
        for tok, a in self._calls(tokens_mask, self.k + drops, chunk):
            n = tok.shape[0]
            idx = torch.arange(n, device=tok.device)
            err = ops.subset_loss(a["gram"], a["ids"], a["logits"], keep_mask, idx, n, self.k, self.renormalize,
                                  target_weights=a.get("target_weights"), cross=a.get("cross"), target_sq=a.get("target_sq"))
            yield tok, err.cpu()


class LazyRecorder(BlockRecorder):
    """Records the first k + 1 ranks of every token into a LazyOutputs (the others wait until
    a candidate needs them: ``LazyOutputs.extend``)."""

    def __init__(self, adapter: MoEAdapter, block: nn.Module, store: LazyOutputs, chunk_tokens: int, first_ranks: int | None = None) -> None:
        super().__init__(adapter, block, store, chunk_tokens)
        self.first = min(store.rank_bound, first_ranks or adapter.top_k + 1)
        store.first_ranks = self.first

    def ranked_outputs(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = ranking(logits, self.store.rank_bound)
        n, d = x.shape[0], self.first
        rows = torch.arange(n, device=x.device).repeat_interleave(d)
        return order, run_pairs(self.adapter, self.block.experts, x, rows, order[:, :d].reshape(-1)).view(n, d, -1)

    def keep(self, chunk: RecordedChunk) -> None:
        c = chunk
        if c.target is None:
            self.store.add_chunk(c.x, c.logits, c.ranked, c.group, c.outputs, c.gram, tw=c.weights)
        else:
            self.store.add_chunk(c.x, c.logits, c.ranked, c.group, c.outputs, c.gram, z=c.target, cross=c.cross, tsq=c.target_sq)
