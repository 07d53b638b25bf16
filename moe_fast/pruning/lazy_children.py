"""Errors of every child D + e of a frontier set D from k + 1 rows per token (renormalized softmax).

With weights renormalized over the chosen experts, a token's error under D + e differs from its
error under D only when e is one of its top k experts kept by D: otherwise its chosen experts,
their weights and its target are unchanged. So a greedy/beam step needs, per token, its error
under D (the base row) and under D minus each of its k chosen experts (k rows: the (k + 1)-th
kept expert takes the dropped one's place), not one error per candidate: k + 1 evaluations per
token instead of E - |D|. The child's per-group error is the parent's plus the changes of the
tokens where e is chosen.

All k + 1 rows of a token are one ``ops.subset_loss`` call's k + 1 candidates on a token-local
problem: its first k + 1 kept slots (in rank order, with their real logits, hence the same
renormalized weights), then (layer-wise) the target's slots among the first k ranks that the
parent drops (logits below the kept ones: every candidate drops them), with the Gram entries among
those slots gathered from the token's computed ones. Candidate 0 keeps the first k slots, candidate
j + 1 all k + 1 but slot j. The errors are the quadratic forms of the rank-bounded search, up to
the order of the floating-point sums; ties are resolved as there (``search.best_sets``).
"""

from __future__ import annotations

import torch

from moe_fast.kernels import ops
from moe_fast.routing import runtime as routing_runtime
from moe_fast.pruning.lazy_outputs import LazyOutputs

def first_kept(order: torch.Tensor, dropped: torch.Tensor, n: int) -> torch.Tensor:
    """Rank positions [T, n] (int64, ascending) of each token's first n experts outside ``dropped``.

    order [T, M] ranked experts, dropped [E] bool. Raises when a token's M ranks keep fewer than n.
    """
    M = order.shape[1]
    kept = ~dropped[order.long()]
    pos = torch.arange(M, device=order.device).expand_as(kept)
    key = torch.where(kept, pos, pos + M)  # kept positions first, each group in rank order
    first = torch.topk(key, n, dim=1, largest=False, sorted=True).values
    if first.numel() and int(first.max()) >= M:
        raise ValueError(f"a token's first {M} ranks keep fewer than {n} experts: the rank bound is too small")
    return first


def token_slots(kept: torch.Tensor, k: int, layerwise: bool) -> torch.Tensor:
    """Ranked slots [T, W] (int64, -1: empty) of each token's row-local problem: its first k + 1
    kept slots (kept [T, k + 1]), then (layer-wise, W = 2k + 1) the target's slots 0..k-1 among
    them that are not kept, ascending; progressive: W = k + 1."""
    if not layerwise:
        return kept
    T = kept.shape[0]
    target = torch.arange(k, device=kept.device)
    taken = (kept.unsqueeze(-1) == target).any(-2)  # [T, k]: target slot kept
    rest = torch.where(taken, torch.full((T, k), 2 * k + 1, dtype=torch.int64, device=kept.device), target.expand(T, k))
    rest = torch.sort(rest, dim=-1).values
    rest = torch.where(rest > 2 * k, torch.full_like(rest, -1), rest)
    return torch.cat([kept, rest], dim=-1)


def row_keep(k: int, width: int) -> torch.Tensor:
    """The k + 1 candidates of the row-local problem [k + 1, width] bool: 0 keeps slots 0..k-1
    (the parent's choice), j + 1 keeps slots 0..k without j (the parent minus its j-th choice)."""
    keep = torch.zeros(k + 1, width, dtype=torch.bool)
    keep[0, :k] = True
    for j in range(k):
        keep[j + 1, : k + 1] = True
        keep[j + 1, j] = False
    return keep


def gather_gram(store: LazyOutputs, slots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gram entries among the slots of the given tokens, packed: slots [n, W] of tokens [n] ->
    [n, W(W+1)/2] float32 (0 where a slot is empty). Every slot must lie within its token's
    computed ranks."""
    n, W = slots.shape
    depth = store.depth[tokens]
    if n and bool((slots >= depth.unsqueeze(1)).any()):
        raise RuntimeError("a token needs a rank beyond those computed: extend it first")
    if not store.hold_outputs:  # lean: read in place, no flat copy
        ia, ib = routing_runtime.triu_pairs(W)
        a, b = slots.index_select(1, ia.to(slots.device)), slots.index_select(1, ib.to(slots.device))
        return store.lean_entries(tokens, torch.minimum(a, b), torch.maximum(a, b))
    flat, start, _, _ = store.flat_entries()
    itype = torch.int32 if flat.numel() < 2**31 else torch.int64
    s, d = slots.to(itype), depth.to(itype).unsqueeze(1)
    # Token t's packed entry (i, j), i <= j, lies at start + i d - i(i + 1)/2 + j (elementwise ops
    # and index_select: far cheaper on the CPU than advanced indexing and where).
    ia, ib = routing_runtime.triu_pairs(W)
    a, b = s.index_select(1, ia.to(slots.device)), s.index_select(1, ib.to(slots.device))
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    idx = start[tokens].to(itype).unsqueeze(1) + lo * d - ((lo * (lo + 1)) >> 1) + hi
    idx.masked_fill_(lo < 0, flat.numel() - 1)
    return flat.index_select(0, idx.view(-1)).view(idx.shape)


def gather_cross(store: LazyOutputs, slots: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Progressive: <y_slot, z> of the slots [n, W] of tokens [n] -> [n, W] float32 (0 where empty)."""
    if not store.hold_outputs:
        return store.lean_cross(tokens, slots)
    _, _, flat, start = store.flat_entries()
    return flat[torch.where(slots >= 0, start[tokens].unsqueeze(1) + slots, flat.numel() - 1)]


def row_errors(store: LazyOutputs, kept: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Squared errors [n, k + 1] float64 of tokens [n] (first k + 1 kept slots ``kept`` [n, k + 1])
    under the parent (column 0) and under the parent minus each of its k chosen experts."""
    k = store.k
    layerwise = not store.progressive
    slots = token_slots(kept, k, layerwise)  # [n, W]
    n, W = slots.shape
    gram = gather_gram(store, slots, tokens)
    ranked = store.order[tokens].long().gather(1, slots.clamp_min(0))
    logits = store.logits[tokens].gather(1, ranked)
    if layerwise:
        # The target's slots that are not kept get logits below the kept ones, in order: ids
        # 0..W-1 are then the row's ranking, and every candidate drops them.
        low = logits[:, : k + 1].nan_to_num(nan=float("-inf")).amin(-1, keepdim=True)
        step = torch.arange(1, W - k, dtype=logits.dtype, device=logits.device)
        logits = torch.cat([logits[:, : k + 1], low - step], dim=-1).contiguous()
        in_target = (slots >= 0) & (slots < k)
        tw = store.tw[tokens].gather(1, slots.clamp(0, k - 1))
        extra = dict(target_weights=torch.where(in_target, tw, torch.zeros_like(tw)).contiguous())
    else:
        extra = dict(cross=gather_cross(store, slots, tokens), target_sq=store.tsq[tokens].contiguous())
    ids = torch.arange(W, dtype=torch.int32, device=slots.device).expand(n, W).contiguous()
    err = ops.subset_loss(gram, ids, logits, row_keep(k, W), torch.arange(n, device=gram.device), n, k, True, **extra)
    return err.t().cpu()


Rows = dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]  # parent -> (first kept slots, row errors)


def child_errors(
    store: LazyOutputs, parent: tuple[int, ...], num_groups: int, rows: Rows | None = None
) -> torch.Tensor:
    """Squared errors [E, G] float64 of every child parent + e per group (rows e in ``parent``:
    meaningless). Needs every token extended to its (k + 1)-th expert outside ``parent``.

    ``rows`` (optional) holds earlier parents' row errors: when it has ``parent`` minus one expert,
    only the tokens whose first k + 1 kept slots differ from that set's are scored again (a
    greedy step changes them for the tokens that kept the newly dropped expert among their first
    k + 1, about (k + 1) / E of them). This parent's rows are added to it.
    """
    if not store.renormalize:
        raise ValueError("child_errors needs weights renormalized over the chosen experts")
    E, k = store.num_experts, store.k
    if store.num_tokens == 0:
        return torch.zeros(E, num_groups, dtype=torch.float64)
    device = store.order.device
    dropped = torch.zeros(E, dtype=torch.bool, device=device)
    dropped[list(parent)] = True
    kept = first_kept(store.order, dropped, k + 1)  # [T, k + 1]
    before = None
    if rows:
        for x in parent:
            before = rows.get(tuple(e for e in parent if e != x))
            if before is not None:
                break
    if before is None:
        err = row_errors(store, kept, torch.arange(kept.shape[0], device=device))  # [T, k + 1]
    else:
        err = before[1].clone()
        changed = torch.nonzero((kept != before[0]).any(1)).squeeze(1)
        if changed.numel():
            err[changed.cpu()] = row_errors(store, kept[changed], changed)
    if rows is not None:
        rows[parent] = (kept, err)
    group = store.group.cpu()
    base = err[:, 0]
    out = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group, base).expand(E, num_groups).clone()
    chosen = store.order.long().gather(1, kept[:, :k]).cpu()  # [T, k] expert ids
    change = err[:, 1:] - base.unsqueeze(1)
    out.view(-1).index_add_(0, (chosen * num_groups + group.unsqueeze(1)).view(-1), change.reshape(-1))
    return out
