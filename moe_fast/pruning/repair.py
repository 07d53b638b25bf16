"""Least-squares repair of a pruned MoE layer: refit the kept experts' down projections.

Why: pruning removes the dropped experts' contribution to the block output. After the selection,
the pruned block's output is linear in the kept experts' down projections D_j [H, I]:
``y_t = sum_j w_tj D_j a_j(x_t)`` (a_j the expert's intermediate activation, w_tj the pruned
routing weight, zero where token t does not route to j). So the correction Delta that brings the
pruned block closest to the unpruned block's output z_t on the calibration tokens is a linear
least-squares problem over the features ``f_t = concat_j(w_tj a_j(x_t))`` (r * I of them):

    min_Delta  sum_t ||e_t - Delta f_t||^2 + lam ||Delta||^2,     e_t = z_t - y_t,

solved jointly over the r kept experts (tokens route to k of them at once, so per-expert solves
would each compensate the whole error and overshoot by about k). The ridge pulls towards the
unrepaired weights, so on the fitted tokens the squared error never grows. Its statistics
``G = sum f f^T`` and ``C = sum f e^T`` are streamed over the calibration batches (pairs of
co-routed experts only), one set for the fitting sequences and one for held-out sequences
(every fifth calibration sequence): lam is the grid value with the least held-out error
(computed from the statistics, no extra pass), then the system is solved once more on all
sequences. A second pass measures the run's objective with the weights as stored (the model's
dtype); a repair that does not lower it is reverted. Costs: docs/REPAIR.md.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from moe_fast.adapters import MoEAdapter
from moe_fast.adapters.base import MoEAdapter as _BaseAdapter
from moe_fast.routing.layer_routing import layer_routing, route_masked
from moe_fast.routing.masked_forward import MaskedForward
from moe_fast.host.ram import available_ram_bytes
from moe_fast.pruning.distributed import Dist
from moe_fast.pruning.hidden_states import HiddenStates

REPAIRS = ("lstsq", "merge")
RIDGE_SCALES = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # times the mean diagonal of G
HELD_OUT_EVERY = 5  # calibration sequence s is held out when s % 5 == 4 (the last one if none is)

# layer -> original expert index -> {"down_proj": [H, I], and for merge "gate_up_proj": [2I, H]}: the new weights
Rows = dict[int, dict[str, torch.Tensor]]
Repaired = dict[int, Rows]


def check_repair_name(repair: str | None) -> None:
    """Refuses an unknown repair before anything is read."""
    if repair is not None and repair not in REPAIRS:
        raise ValueError(f"repair must be None or one of {', '.join(REPAIRS)}; got {repair!r}")


def check_repair_supported(repair: str | None, adapter: MoEAdapter) -> None:
    """Refuses, before any forward, what the repairs do not handle yet: experts whose forward is
    not the standard gated ``down_proj(act(gate) * up)`` without biases (the least-squares refit
    assumes an output linear in a bias-free down projection; the merge averages exactly those
    weights). ``resume`` is accepted: each finished layer's repaired rows are saved in the partial
    folder beside its progress (``save_rows``, ``load_repaired``); so are data-parallel runs (the
    statistics and per-batch errors are summed over ranks: ``RankSums``)."""
    if repair is None:
        return
    family = adapter.family or type(adapter).__name__
    if type(adapter).expert_forward is not _BaseAdapter.expert_forward:
        raise ValueError(f"repair={repair!r} is not supported for the {family} family: its experts do not run the "
                         "standard down_proj(act(gate) * up) forward (e.g. biases or clamped activations) that the "
                         "repairs assume (docs/REPAIR.md)")


def expert_width(config) -> int:
    """I, the routed experts' intermediate size, from a config (``moe_intermediate_size`` where the
    family has a separate dense width, else ``intermediate_size``)."""
    width = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", None)
    if not width:
        raise ValueError(f"repair: found no expert width (moe_intermediate_size / intermediate_size) in {type(config).__name__}")
    return int(width)


STATISTICS_DTYPES = (torch.float64, torch.float32)  # preferred first: float32 where float64 does not fit


def statistics_bytes(num_keep: int, width: int, hidden: int, dtype: torch.dtype = torch.float64) -> int:
    """Peak bytes of one layer's normal equations: two splits' Grams plus one factored copy, and C."""
    n = num_keep * width
    size = torch.empty((), dtype=dtype).element_size()
    return 3 * n * n * size + 2 * n * hidden * size


def free_bytes(device: torch.device) -> int:
    """Memory free for the statistics now: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_ram_bytes()


def check_repair_fits(repair: str | None, config, num_keep: int, device: torch.device) -> torch.dtype | None:
    """The dtype of the least-squares statistics: float64 where the joint normal equations
    (n = keep x expert width) fit ``device``'s free memory, else float32 (half the bytes; the ridge
    grid's held-out check still picks a well-conditioned solve), else refused before any forward
    (costs: docs/REPAIR.md). None for the merge, which holds E x E numbers per layer."""
    if repair != "lstsq":
        return None
    width, hidden = expert_width(config), int(config.hidden_size)
    free = free_bytes(device)
    for dtype in STATISTICS_DTYPES:
        if statistics_bytes(num_keep, width, hidden, dtype) <= free:
            return dtype
    need = statistics_bytes(num_keep, width, hidden, STATISTICS_DTYPES[-1])
    raise ValueError(
        f"repair={repair!r} holds per layer a joint least-squares system over keep x expert width = "
        f"{num_keep} x {width} = {num_keep * width} features: {need / 2**30:.1f} GiB even in float32 "
        f"({statistics_bytes(num_keep, width, hidden) / 2**30:.1f} GiB in float64), more than the "
        f"{free / 2**30:.1f} GiB free on {device}; keep fewer experts or use a larger device (docs/REPAIR.md)"
    )


@dataclass
class _Split:
    """Normal-equation statistics of one split of the calibration sequences (float64, or float32
    where float64 does not fit: ``check_repair_fits``)."""

    gram: torch.Tensor  # [n, n] sum f f^T (upper blocks filled while streaming, mirrored by ``finish``)
    cross: torch.Tensor  # [n, H] sum f e^T
    err_sq: float = 0.0  # sum ||e||^2

    def finish(self, blocks: int, width: int) -> None:
        for p in range(blocks):
            for q in range(p + 1, blocks):
                self.gram[q * width:(q + 1) * width, p * width:(p + 1) * width] = \
                    self.gram[p * width:(p + 1) * width, q * width:(q + 1) * width].T


def activations(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The expert's intermediate activation act(gate) * up [N, I], as the stock experts compute it."""
    gate, up = nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


class RankSums:
    """What a repair shares between data-parallel ranks (``Dist``; one process: nothing to do).

    Every rank holds whole calibration batches, so a repair's statistics are sums over ranks, and
    its per-batch squared errors come from one rank each; after these every rank holds the same
    numbers and decides alike."""

    def __init__(self, ctx: Dist | None = None) -> None:
        self.ctx = ctx or Dist()

    def tensors(self, *tensors: torch.Tensor) -> None:
        """Sums each tensor over ranks, in place."""
        if self.ctx.active:
            for t in tensors:
                t.copy_(self.ctx.sum(t))

    def number(self, value: float) -> float:
        if not self.ctx.active:
            return value
        return float(self.ctx.sum(torch.tensor([value], dtype=torch.float64)))

    def per_batch(self, errors: dict[int, float]) -> dict[int, float]:
        """The per-batch errors of every rank (each batch is on one rank)."""
        if not self.ctx.active:
            return errors
        merged: dict[int, float] = {}
        for part in self.ctx.gather(errors):
            merged.update(part)
        return merged

    def same_as_rank_0(self, value):
        """Rank 0's ``value`` on every rank (a solve or choice that must not differ in its last bit)."""
        return self.ctx.broadcast(value) if self.ctx.active else value


class LstsqRepair:
    """Refits the kept experts' down projections of one layer at a time (see the module docstring)."""

    def __init__(self, adapter: MoEAdapter, objective: str, chunk_tokens: int, ctx: Dist | None = None,
                 statistics_dtype: torch.dtype | None = None) -> None:
        self.adapter, self.objective, self.chunk = adapter, objective, max(1, chunk_tokens)
        self.ranks = RankSums(ctx)
        self.dtype = statistics_dtype or torch.float64

    def run(self, stream: HiddenStates, layer: nn.Module, block: nn.Module, kept: list[int],
            inputs: torch.Tensor) -> tuple[dict, Rows]:
        """Repairs ``block`` in place (its kept experts' down_proj rows); returns (the report's
        entry, {expert: {"down_proj": new [H, I]}}, empty when reverted). ``inputs``: the unpruned
        stream's input of ``layer`` (the targets; layer-wise also the block inputs)."""
        experts = block.experts
        kept = sorted(kept)
        width, hidden = experts.down_proj.shape[2], experts.down_proj.shape[1]
        n = len(kept) * width
        device = experts.down_proj.device
        fit = _Split(torch.zeros(n, n, dtype=self.dtype, device=device), torch.zeros(n, hidden, dtype=self.dtype, device=device))
        held = _Split(torch.zeros_like(fit.gram), torch.zeros_like(fit.cross))
        masked = MaskedForward(self.adapter, block, kept, chunk_tokens=self.chunk)
        before: dict[int, float] = {}
        for batch, seq, x, z in block_io(stream, layer, block, inputs):
            before[batch] = before.get(batch, 0.0) + squared_error(masked, x, z)
            holdout = _held_out(seq, stream)
            for split, rows in ((fit, ~holdout), (held, holdout)):
                if bool(rows.any()):
                    self._accumulate(split, block, kept, x[rows], z[rows], width)
        self.ranks.tensors(fit.gram, fit.cross, held.gram, held.cross)
        fit.err_sq, held.err_sq = self.ranks.number(fit.err_sq), self.ranks.number(held.err_sq)
        before = self.ranks.per_batch(before)
        fit.finish(len(kept), width)
        held.finish(len(kept), width)
        scale, chosen, held_errors = self.ranks.same_as_rank_0(_choose_ridge(fit, held))
        entry = {"method": "lstsq", "loss_before": objective_loss(self.objective, before), "loss_after": None, "ridge": None,
                 "ridge_scale": None, "held_out_error_before": held.err_sq, "held_out_error_after": None,
                 "features": n, "statistics_bytes": statistics_bytes(len(kept), width, hidden, self.dtype),
                 "statistics_dtype": str(self.dtype).replace("torch.", ""), "reverted": False}
        if chosen is None:  # no ridge beat the unrepaired weights on the held-out sequences
            entry["loss_after"] = entry["loss_before"]
            return entry, {}
        fit.gram += held.gram  # every sequence for the final solve, in place (no third Gram held)
        fit.cross += held.cross
        del held
        delta = self.ranks.same_as_rank_0(_solve(fit.gram, fit.cross, chosen))  # [n, H]
        new = {e: {"down_proj": (experts.down_proj[e].double() + delta[p * width:(p + 1) * width].T).to(experts.down_proj.dtype)}
               for p, e in enumerate(kept)}
        after = self.ranks.per_batch(layer_losses(stream, layer, block, inputs, masked, [new])[0])  # z from the original weights
        entry.update(loss_after=objective_loss(self.objective, after), ridge=chosen, ridge_scale=scale,
                     held_out_error_after=held_errors[scale])
        return keep_if_lower(entry, experts, new)

    def _accumulate(self, split: _Split, block: nn.Module, kept: list[int], x: torch.Tensor, z: torch.Tensor, width: int) -> None:
        for lo in range(0, x.shape[0], self.chunk):
            xs, zs = x[lo:lo + self.chunk], z[lo:lo + self.chunk]
            feats, y = self._features(block, kept, xs)
            extra = self.adapter.extra_output(block, xs)
            e = zs.double() - y - (0.0 if extra is None else extra.double())
            split.err_sq += float((e * e).sum())
            _add_pairs(split, [(tok, a.to(self.dtype)) for tok, a in feats], e.to(self.dtype), width, xs.shape[0])

    def _features(self, block: nn.Module, kept: list[int], x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per kept expert (position p): (its tokens, w * a [n_p, I] float64), and the routed output y [T, H] float64."""
        experts = block.experts
        mask = torch.zeros(self.adapter.num_experts, dtype=torch.bool, device=x.device)
        mask[kept] = True
        logits = self.adapter.router_logits(block, x).float().contiguous()
        route = route_masked(logits, layer_routing(self.adapter, block), keep=mask)
        ids, weights = route.ids.long(), route.weights
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
        feats = []
        for e in kept:
            tok, slot = (ids == e).nonzero(as_tuple=True)
            a = activations(experts, e, x[tok]).double() * weights[tok, slot].double().unsqueeze(-1)
            y.index_add_(0, tok, a @ experts.down_proj[e].double().T)
            feats.append((tok, a))
        return feats, y



def objective_loss(objective: str, per_batch: dict[int, float]) -> float:
    """The run's objective from per-batch squared errors: ``paper`` the sum of their square roots
    (Frobenius norms), ``mse`` their sum."""
    values = [max(0.0, v) for _, v in sorted(per_batch.items())]
    return sum(math.sqrt(v) for v in values) if objective == "paper" else sum(values)


def layer_losses(stream: HiddenStates, layer: nn.Module, block: nn.Module, inputs: torch.Tensor,
                 masked: MaskedForward, candidates: list[Rows]) -> list[dict[int, float]]:
    """Per candidate set of new rows, the pruned block's squared error per calibration batch, run as
    the export runs it (``masked``), against the unpruned block's output (one pass over the batches)."""
    errors: list[dict[int, float]] = [{} for _ in candidates]
    for batch, _, x, z in block_io(stream, layer, block, inputs):
        for errs, rows in zip(errors, candidates):
            with swapped_rows(block.experts, rows):
                errs[batch] = errs.get(batch, 0.0) + squared_error(masked, x, z)
    return errors


def keep_if_lower(entry: dict, experts: nn.Module, new: Rows) -> tuple[dict, Rows]:
    """Writes ``new`` into ``experts`` when it lowered the loss (``entry``'s loss_after < loss_before);
    otherwise marks the entry reverted (loss_after = loss_before) and writes nothing. Returns
    (entry, the rows written, on the CPU, for the export)."""
    if not entry["loss_after"] < entry["loss_before"]:  # stored in the model's dtype, the repair may not pay
        entry.update(loss_after=entry["loss_before"], reverted=True)
        return entry, {}
    write_rows(experts, new)
    return entry, {e: {name: t.detach().to("cpu", copy=True) for name, t in rows.items()} for e, rows in new.items()}


def _add_pairs(split: _Split, feats: list[tuple[torch.Tensor, torch.Tensor]], e: torch.Tensor, width: int, tokens: int) -> None:
    """G's upper blocks from the tokens each pair of kept experts shares; C from each expert's tokens."""
    where = []
    for tok, _ in feats:
        pos = torch.full((tokens,), -1, dtype=torch.long, device=tok.device)
        pos[tok] = torch.arange(tok.numel(), device=tok.device)
        where.append(pos)
    for p, (tok_p, a_p) in enumerate(feats):
        if tok_p.numel() == 0:
            continue
        rows = slice(p * width, (p + 1) * width)
        split.cross[rows] += a_p.T @ e[tok_p]
        for q in range(p, len(feats)):
            at = where[q][tok_p]
            shared = at >= 0
            if bool(shared.any()):
                split.gram[rows, q * width:(q + 1) * width] += a_p[shared].T @ feats[q][1][at[shared]]


def _held_out(seq: torch.Tensor, stream: HiddenStates) -> torch.Tensor:
    """Which tokens belong to held-out sequences (``seq``: each token's calibration sequence, counted
    over every rank's batches, so that data-parallel runs hold out the same sequences)."""
    total = stream.num_sequences
    held = seq % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    if total < HELD_OUT_EVERY:
        held = seq == total - 1
    return held


def _solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + ridge I)^-1 C by Cholesky (ridge > 0 makes it positive definite), factored in place
    in one n x n copy of G: the peak is the two splits' Grams plus this one."""
    a = gram.clone()
    a.diagonal().add_(ridge)
    info = torch.empty((), dtype=torch.int32, device=a.device)
    torch.linalg.cholesky_ex(a, out=(a, info))
    if int(info) != 0:
        a = gram.clone()
        a.diagonal().add_(ridge)
        return torch.linalg.solve(a, cross)
    return torch.cholesky_solve(cross, a)


def _choose_ridge(fit: _Split, held: _Split) -> tuple[float | None, float | None, dict[float, float]]:
    """(scale, ridge) with the least held-out squared error, fitted on ``fit``; (None, None) when
    none beats the unrepaired weights (Delta = 0, error ``held.err_sq``) or nothing was routed."""
    n = fit.gram.shape[0]
    base = float(torch.diagonal(fit.gram).sum()) / max(1, n)
    errors: dict[float, float] = {}
    if base <= 0.0 or held.err_sq <= 0.0:
        return None, None, errors
    for scale in RIDGE_SCALES:
        delta = _solve(fit.gram, fit.cross, scale * base)  # [n, H]
        err = held.err_sq - 2.0 * float((delta * held.cross).double().sum()) + float((delta * (held.gram @ delta)).double().sum())
        if err != err:  # a float32 solve that broke down (NaN): this ridge is not a candidate
            continue
        errors[scale] = err
    if not errors:
        return None, None, errors
    scale = min(errors, key=lambda s: (errors[s], -s))
    if not errors[scale] < held.err_sq:
        return None, None, errors
    return scale, scale * base, errors


def squared_error(masked: MaskedForward, x: torch.Tensor, z: torch.Tensor) -> float:
    """sum ||z - pruned block(x)||^2 over the tokens, the pruned block run as the export runs it."""
    out = masked(x)
    out = out[0] if isinstance(out, tuple) else out
    return float(((z.double() - out.double()) ** 2).sum())


@contextlib.contextmanager
def swapped_rows(experts: nn.Module, new: Rows) -> Iterator[None]:
    """The experts' tensors (``down_proj``, ``gate_up_proj``) with the rows ``new`` replaced, for the
    block's duration; the originals after."""
    names = sorted({name for rows in new.values() for name in rows})
    originals = {name: getattr(experts, name) for name in names}
    for name, original in originals.items():
        swapped = original.detach().clone()
        for e, rows in new.items():
            if name in rows:
                swapped[e] = rows[name]
        setattr(experts, name, nn.Parameter(swapped, requires_grad=False))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(experts, name, original)


def write_rows(experts: nn.Module, new: Rows) -> None:
    """Writes repaired rows into the experts' tensors in place (each stored tensor stays the same object)."""
    with torch.no_grad():
        for e, rows in new.items():
            for name, t in rows.items():
                stored = getattr(experts, name)
                stored.data[e].copy_(t.to(stored.device, stored.dtype))


def apply_repaired(model: nn.Module, adapter: MoEAdapter, repaired: Repaired) -> None:
    """Writes a run's repaired expert weights into a loaded, unpruned model (original expert indices)."""
    layers = adapter.decoder_layers(model)
    for index, new in repaired.items():
        write_rows(adapter.moe_block(layers[index]).experts, new)


ROWS_FILE = "repaired_layer_{}.safetensors"  # in the partial folder: one finished layer's repaired rows


def save_rows(folder: str, index: int, rows: Rows) -> None:
    """Saves layer ``index``'s repaired rows into the partial folder (one rename: a kill leaves the
    old file or the new one). Called before the progress that names the layer finished, so a
    resume that finds the layer finished finds its rows."""
    from safetensors.torch import save_file

    path = os.path.join(folder, ROWS_FILE.format(index))
    tensors = {f"{e}.{name}": t.detach().to("cpu").contiguous() for e, named in rows.items() for name, t in named.items()}
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_repaired(folder: str | None, layers: dict) -> Repaired:
    """Resume: the saved repaired rows of the finished layers ``layers`` ({index: LayerResult}) that
    were repaired and kept (a reverted repair, or one without a ridge, wrote nothing)."""
    from safetensors.torch import load_file

    out: Repaired = {}
    if folder is None:
        return out
    for index, result in sorted(layers.items()):
        if not result.repair or result.repair.get("reverted") or not result.repair["loss_after"] < result.repair["loss_before"]:
            continue
        path = os.path.join(folder, ROWS_FILE.format(index))
        if not os.path.exists(path):
            raise ValueError(f"resume: layer {index} was repaired but {path} is missing; run without --resume to start over")
        rows: Rows = {}
        for key, t in load_file(path).items():
            expert, name = key.split(".", 1)
            rows.setdefault(int(expert), {})[name] = t
        out[index] = rows
    return out


def block_io(stream: HiddenStates, layer: nn.Module, block: nn.Module, inputs: torch.Tensor
             ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per calibration batch: (batch index, each token's sequence index [T], block input x [T, H],
    the unpruned block's output z [T, H]). Layer-wise both come from ``inputs``; progressive the
    block input comes from the pruned stream (not yet moved past ``layer``) and z from ``inputs``."""
    for b, rows in stream.batches:
        kwargs = stream.kwargs(rows, layer)
        x, z = _captured(layer, block, inputs[rows], kwargs)
        if stream.progressive:
            x, _ = _captured(layer, block, stream.pruned[rows], kwargs)
        length = inputs.shape[1]
        first = b * stream.batch_size  # global calibration sequence index of the batch's first row
        seq = torch.arange(first, first + rows.stop - rows.start, device=x.device).repeat_interleave(length)
        yield b, seq, x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])


def _captured(layer: nn.Module, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the block's input, its stock output) while ``layer`` runs on ``hidden``."""
    seen = {}

    def hook(module, args, kw, output):
        seen["x"] = args[0] if args else kw["hidden_states"]
        seen["z"] = output[0] if isinstance(output, tuple) else output

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        layer(hidden, **kwargs)
    finally:
        handle.remove()
    return seen["x"], seen["z"]
