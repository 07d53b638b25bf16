"""Baseline expert-selection criteria to compare reconstruction-loss pruning against.

* ``random``: R experts per layer drawn uniformly (the paper's random baseline);
* ``frequency``: the R experts most often in a token's top-k on calibration data (the paper's
  frequency baseline);
* ``reap``: router-weighted expert activation norm (REAP): per expert, the mean over the tokens
  routed to it of (its top-k routing weight, renormalized as the model does, x ||expert
  output||_2); keep the R largest. ``saliency`` is an alias (the name this criterion had first);
* ``ean``: expert activation norm: per expert, the mean over the tokens routed to it of
  ||expert output||_2, no gate weight; keep the R largest.

An expert no calibration token routes to scores 0 under ``reap`` and ``ean``. Ties go to the
lower expert index. All statistics come from the unpruned model on the
calibration tokens (layer-wise inputs). A selection ``{layer: kept experts}`` is applied with
the pruning code's exporter (:mod:`moe_fast.export`), so the result is the same kind of
checkpoint as ``moe-fast prune`` writes.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.staging import staged_directory

log = logging.getLogger(__name__)

CRITERIA = ("random", "frequency", "reap", "ean")
ALIASES = {"saliency": "reap"}


def canonical_criterion(name: str) -> str:
    """The criterion's own name (``saliency`` -> ``reap``), or a ValueError naming the choices."""
    name = ALIASES.get(name, name)
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose from {', '.join(CRITERIA + tuple(ALIASES))}")
    return name


# ------------------------------------------------------------------------------ per layer
def _check(num_experts: int, num_keep: int) -> None:
    if not 1 <= num_keep <= num_experts:
        raise ValueError(f"keep must be in [1, {num_experts}], got {num_keep}")


def select_random(num_experts: int, num_keep: int, seed: int | random.Random) -> list[int]:
    """``num_keep`` experts drawn uniformly without replacement, sorted."""
    _check(num_experts, num_keep)
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return sorted(rng.sample(range(num_experts), num_keep))


def top_scores(scores: torch.Tensor | list[float], num_keep: int) -> list[int]:
    """Indices of the ``num_keep`` largest scores (ties: lower index first), sorted."""
    values = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    _check(len(values), num_keep)
    order = sorted(range(len(values)), key=lambda e: (-values[e], e))
    return sorted(order[:num_keep])


def select_frequency(counts: torch.Tensor | list[float], num_keep: int) -> list[int]:
    """The ``num_keep`` experts routed most often (``counts[e]``: top-k appearances of expert e)."""
    return top_scores(counts, num_keep)


def select_saliency(saliency: torch.Tensor | list[float], num_keep: int) -> list[int]:
    """The ``num_keep`` experts of largest score (``reap`` or ``ean`` values per expert)."""
    return top_scores(saliency, num_keep)


# ------------------------------------------------------------------------------ statistics
@dataclass
class RoutingStats:
    """Per MoE layer statistics of the unpruned model on calibration tokens."""

    layers: list[int]
    counts: list[list[float]]  # [layer][expert]: top-k appearances
    reap: list[list[float]]  # [layer][expert]: mean over routed tokens of w * ||y_e||
    ean: list[list[float]]  # [layer][expert]: mean over routed tokens of ||y_e||
    tokens: int

    @property
    def saliency(self) -> list[list[float]]:
        return self.reap

    def table_for(self, criterion: str) -> list[list[float]]:
        """Per layer, the per-expert scores a criterion keeps the largest of."""
        return {"frequency": self.counts, "reap": self.reap, "ean": self.ean}[canonical_criterion(criterion)]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "counts": self.counts, "reap": self.reap, "ean": self.ean, "tokens": self.tokens}


def scores_from_sums(counts: torch.Tensor, weighted_norms: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reap, ean) per expert from sums over routed tokens; 0 for an expert no token reached."""
    routed = counts.clamp_min(1)
    zero = torch.zeros_like(weighted_norms)
    return torch.where(counts > 0, weighted_norms / routed, zero), torch.where(counts > 0, norms / routed, zero)


def layer_scores_from_ranked(
    ids: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts, reap, ean) of one layer from each token's routed experts.

    ``ids`` [T, k] the top-k experts, ``weights`` [T, k] their routing weights, ``norms`` [T, k]
    the L2 norms of their outputs. Why: the pruning search already computes these outputs (their
    Gram diagonal holds the squared norms), so every criterion can come from one pass.
    """
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts).double()
    wn = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, flat, (weights.double() * norms.double()).reshape(-1))
    n = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, flat, norms.double().reshape(-1))
    reap, ean = scores_from_sums(counts, wn, n)
    return counts, reap, ean


@torch.no_grad()
def routing_stats(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8, progress: bool = True) -> RoutingStats:
    """Counts and saliency of every expert of every MoE layer on ``calibration`` ids [N, L].

    Hooks the experts modules, so each layer sees the unpruned model's own inputs and routing.
    """
    from tqdm import tqdm

    from moe_fast.adapters import get_adapter

    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    E = adapter.num_experts
    counts = {ref.layer: torch.zeros(E, dtype=torch.float64) for ref in blocks}
    sal_sum = {ref.layer: torch.zeros(E, dtype=torch.float64) for ref in blocks}
    norm_sum = {ref.layer: torch.zeros(E, dtype=torch.float64) for ref in blocks}

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            hidden, index, weights = (list(args) + [kwargs.get(k) for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs])[:3]
            for e in range(E):
                tok, slot = torch.where(index == e)
                if tok.numel() == 0:
                    continue
                y = adapter.expert_forward(module, e, hidden[tok])
                norm = y.float().norm(dim=-1).double()
                counts[layer][e] += tok.numel()
                sal_sum[layer][e] += (weights[tok, slot].double() * norm).sum()
                norm_sum[layer][e] += norm.sum()

        return hook

    handles = [ref.experts.register_forward_pre_hook(make_hook(ref.layer), with_kwargs=True) for ref in blocks]
    device = next(model.parameters()).device
    model.eval()
    try:
        for batch in tqdm(calibration.split(batch_size), desc="routing statistics", disable=not progress):
            model(input_ids=batch.to(device))
    finally:
        for h in handles:
            h.remove()
    layers = [ref.layer for ref in blocks]
    scores = {l: scores_from_sums(counts[l], sal_sum[l], norm_sum[l]) for l in layers}
    return RoutingStats(
        layers, [counts[l].tolist() for l in layers], [scores[l][0].tolist() for l in layers],
        [scores[l][1].tolist() for l in layers], int(calibration.numel()),
    )


def select(criterion: str, num_experts: int, num_keep: int, layers: list[int], stats: RoutingStats | None = None, seed: int = 0) -> dict[int, list[int]]:
    """{layer: kept experts} for a criterion; ``stats`` is needed for all but random."""
    criterion = canonical_criterion(criterion)
    if criterion == "random":
        rng = random.Random(seed)
        return {layer: select_random(num_experts, num_keep, rng) for layer in layers}
    if stats is None:
        raise ValueError(f"criterion {criterion!r} needs routing statistics from calibration data")
    return {layer: top_scores(row, num_keep) for layer, row in zip(stats.layers, stats.table_for(criterion))}


# ------------------------------------------------------------------------------ applying
def apply_selection(
    model_path: str,
    kept: dict[int, list[int]],
    out: str,
    record: dict,
    tokenizer=None,
) -> str:
    """Writes the checkpoint at ``model_path`` with only ``kept`` experts into ``out`` (moved in whole)."""
    from moe_fast.adapters import get_adapter
    from moe_fast.export import export_checkpoint
    from transformers import AutoConfig

    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"output directory {out!r} exists and is not empty")
    adapter = get_adapter(AutoConfig.from_pretrained(model_path))
    with staged_directory(out) as tmp:
        export_checkpoint(model_path, tmp, adapter, {int(k): sorted(v) for k, v in kept.items()}, record, tokenizer)
    return out


def prune_baseline(
    model_path: str,
    calibration,
    num_keep: int,
    criterion: str,
    out: str | None = None,
    *,
    seed: int = 42,
    n_samples: int | None = 128,
    seq_len: int | None = 2048,
    batch_size: int = 8,
    device: str = "cpu",
    stats: RoutingStats | None = None,
    progress: bool = True,
) -> tuple[dict[int, list[int]], dict]:
    """Selects ``num_keep`` experts per layer by ``criterion`` and (with ``out``) writes the checkpoint.

    Returns (kept, record); ``record`` is what goes to ``config.json`` under
    ``moe_fast.pruning`` (criterion, keep, seed, kept, and the statistics used). Pass ``stats``
    to reuse routing statistics across several calls on the same model and calibration.
    """
    from transformers import AutoConfig

    from moe_fast.adapters import get_adapter
    from moe_fast.loading import load_tokenizer

    criterion = canonical_criterion(criterion)
    config = AutoConfig.from_pretrained(model_path)
    adapter = get_adapter(config)
    E = adapter.num_experts
    if not adapter.top_k <= num_keep < E:
        raise ValueError(f"keep must satisfy top-k ({adapter.top_k}) <= keep < experts ({E}), got {num_keep}")
    tokenizer = load_tokenizer(model_path)
    num_layers = int(config.num_hidden_layers)
    if criterion != "random" and stats is None:
        from moe_fast.calibration import load_calibration
        from moe_fast.model_checks import model_limits

        ids = load_calibration(calibration, tokenizer, n_samples, seq_len, seed, *model_limits(config))
        from moe_fast.loading import load_pretrained

        model = load_pretrained(model_path, dtype=torch.float32).to(device)
        stats = routing_stats(model, ids, batch_size, progress)
        del model
    layers = stats.layers if stats is not None else _moe_layers(adapter, num_layers)
    kept = select(criterion, E, num_keep, layers, stats, seed)
    record = {"criterion": criterion, "keep": num_keep, "seed": seed, "kept": {str(k): v for k, v in kept.items()}}
    if criterion != "random":
        record["calibration"] = calibration if isinstance(calibration, str) else "tensor"
        record["statistics"] = stats.to_dict()
    if out is not None:
        apply_selection(model_path, kept, out, record, tokenizer)
    return kept, record


def _moe_layers(adapter, num_layers: int) -> list[int]:
    """Indices of the decoder layers with an MoE block, from the config (no weights loaded)."""
    config = adapter.config
    sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
    only_dense = set(getattr(config, "mlp_only_layers", []) or [])
    return [i for i in range(num_layers) if i not in only_dense and (i + 1) % sparse_step == 0]
