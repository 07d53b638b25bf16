"""Skip thresholds (betas) per layer: how they are checked, a calibration's result, the record.

What one beta argument may be (a number, a sequence, a tensor) is read in ``beta_args``, below the
ops, which take betas too.

Why a module of its own: ``patch`` reads betas and ``calibrate_skipping`` produces them, and
calibrating needs ``patch``'s switch to turn skipping off; with the beta rule here both import
it and the imports run one way (skipping -> patching -> betas). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

from moe_fast.kernels.beta_args import beta_entries, per_slot
from moe_fast.checkpoint.config_record import SKIP_RECORD_VERSION


BetaSpec = Any  # None | float | SkipCalibration | Sequence[float | Sequence[float] | None] | Mapping[int, ...]
LayerBetas = dict[int, "list[float] | None"]  # decoder layer index -> k - 1 thresholds, or None (no skipping)


@dataclass
class SkipCalibration:
    """Result of :func:`moe_fast.calibrate_skipping`; pass it (or ``.betas``) to ``moe_fast.patch``."""

    layers: list[int]  # decoder layer index of each MoE block
    betas: list[list[float]]  # per MoE block: k - 1 thresholds (slots 1..k-1)
    skip_rate: list[list[float]]  # per MoE block and slot: fraction of calibration tokens skipping it
    quantile: float
    num_tokens: int
    top_k: int
    extra: dict = field(default_factory=dict)

    @property
    def saved_fraction(self) -> list[float]:
        """Per MoE block: fraction of all expert calls (T * k) that skipping removes."""
        return [sum(r) / self.top_k for r in self.skip_rate]

    def to_dict(self) -> dict:
        return asdict(self) | {"saved_fraction": self.saved_fraction}

    def table(self) -> str:
        """Human-readable per-layer table."""
        slots = self.top_k - 1
        head = ["layer"] + [f"beta_{j}" for j in range(1, slots + 1)]
        head += [f"skip_{j}" for j in range(1, slots + 1)] + ["calls saved"]
        rows = [head]
        for layer, b, r, s in zip(self.layers, self.betas, self.skip_rate, self.saved_fraction):
            rows.append([str(layer)] + [f"{x:.4f}" for x in b] + [f"{x:.1%}" for x in r] + [f"{s:.1%}"])
        widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def check_beta(value: Any, where: str) -> float:
    """One threshold as a float in [0, 1], or a ValueError naming ``where``."""
    try:
        b = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"moe_fast: beta for {where} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= b <= 1.0) or math.isnan(b):
        raise ValueError(f"moe_fast: beta for {where} must be in [0, 1], got {b}")
    return b


def layer_betas(value: Any, k: int, where: str) -> list[float] | None:
    """One layer's entry (a number, k - 1 numbers, a tensor or None) as k - 1 checked thresholds."""
    try:
        entries = beta_entries(value)
    except ValueError:  # a string: named with its place
        raise ValueError(f"moe_fast: beta for {where} must be a number in [0, 1], got {value!r} (a string)") from None
    if entries is None:
        return None
    if len(entries) == 1:
        return per_slot([check_beta(entries[0], where)], k)
    if len(entries) != max(k - 1, 1):
        raise ValueError(
            f"moe_fast: {where} needs one beta or k - 1 = {k - 1} betas (slots 1..{k - 1}), got {len(entries)}"
        )
    return [check_beta(v, f"{where} slot {j + 1}") for j, v in enumerate(entries)]


def normalize_betas(betas: BetaSpec, layers: Sequence[int], k: int) -> LayerBetas:
    """Validates betas and returns {decoder layer index: k - 1 thresholds or None (no skipping)}.

    Accepted: None, one number for every layer, a :class:`SkipCalibration`, a sequence with one
    entry per MoE block (a number, k - 1 numbers, or None), or a mapping {layer index: entry}.
    """
    layers = list(layers)
    if betas is None:
        return {layer: None for layer in layers}
    if isinstance(betas, (str, bytes)):  # not a sequence of per-layer betas: one refusal for every form
        raise ValueError(f"moe_fast: betas must be numbers, not the string {betas!r}")
    if isinstance(betas, SkipCalibration):
        if list(betas.layers) != layers:
            raise ValueError(
                f"moe_fast: these betas were calibrated for MoE layers {betas.layers}, the model has {layers}"
            )
        betas = betas.betas
    if isinstance(betas, (int, float)) or (isinstance(betas, torch.Tensor) and betas.numel() == 1):
        return {layer: layer_betas(betas, k, f"layer {layer}") for layer in layers}
    if isinstance(betas, Mapping):
        unknown = sorted(set(int(x) for x in betas) - set(layers))
        if unknown:
            raise ValueError(f"moe_fast: betas given for layers {unknown}, which are not MoE layers {layers}")
        return {layer: layer_betas(betas.get(layer, betas.get(str(layer))), k, f"layer {layer}") for layer in layers}
    if isinstance(betas, torch.Tensor):
        betas = betas.tolist()
    betas = list(betas)
    if len(betas) != len(layers):
        raise ValueError(
            f"moe_fast: got {len(betas)} betas but the model has {len(layers)} MoE layers; "
            "give one entry per MoE layer (a number, or k - 1 numbers for k > 2)"
        )
    return {layer: layer_betas(b, k, f"layer {layer}") for layer, b in zip(layers, betas)}


def skipping_record(betas: BetaSpec, layers: Sequence[int], k: int) -> dict[str, Any]:
    """config.json's ``moe_fast.skipping`` entry for ``betas`` on the MoE layers ``layers``.

    One writer for both places that record betas: a patched model's config (``patch``) and a
    checkpoint's config.json rewritten without loading a patched model (``moe-fast skip``).
    """
    per_layer = normalize_betas(betas, layers, k)
    entries = [per_layer[layer] for layer in layers]
    record: dict[str, Any] = {"betas": entries if any(b is not None for b in entries) else None}
    if record["betas"] is not None:
        record["layers"] = list(layers)
        # The record's layout version: readers that skip elsewhere (the vLLM plugin) refuse others.
        record["version"] = SKIP_RECORD_VERSION
    if isinstance(betas, SkipCalibration):
        record.update(quantile=betas.quantile, calibration_tokens=betas.num_tokens, skip_rate=betas.skip_rate)
    return record
