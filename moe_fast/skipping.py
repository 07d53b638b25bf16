"""Dynamic expert skipping: calibrating the per-layer thresholds beta and validating them.

The paper's rule (reference.route): slot j >= 1 of a token is skipped when ``w_j < beta_j * w_0``. beta of a
layer is the quantile q (default the median) over calibration tokens of ``w_j / w_0``, computed
from the softmax over all experts, so that about a fraction q of the tokens skip slot j.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from moe_fast.adapters import get_adapter

log = logging.getLogger(__name__)

BetaSpec = Any  # None | float | SkipCalibration | Sequence[float | Sequence[float] | None] | Mapping[int, ...]


@dataclass
class SkipCalibration:
    """Result of :func:`calibrate_skipping`; pass it (or ``.betas``) to ``moe_fast.patch``."""

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


def _check_beta(value: Any, where: str) -> float:
    try:
        b = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"moe_fast: beta for {where} must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= b <= 1.0) or math.isnan(b):
        raise ValueError(f"moe_fast: beta for {where} must be in [0, 1], got {b}")
    return b


def _layer_betas(value: Any, k: int, where: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist()
        value = value[0] if len(value) == 1 else value
    if isinstance(value, (int, float)):
        return [_check_beta(value, where)] * max(k - 1, 1)
    values = list(value)
    if len(values) == 1:
        values = values * max(k - 1, 1)
    if len(values) != max(k - 1, 1):
        raise ValueError(
            f"moe_fast: {where} needs one beta or k - 1 = {k - 1} betas (slots 1..{k - 1}), got {len(values)}"
        )
    return [_check_beta(v, f"{where} slot {j + 1}") for j, v in enumerate(values)]


def normalize_betas(betas: BetaSpec, layers: Sequence[int], k: int) -> dict[int, list[float] | None]:
    """Validates betas and returns {decoder layer index: k - 1 thresholds or None (no skipping)}.

    Accepted: None, one number for every layer, a :class:`SkipCalibration`, a sequence with one
    entry per MoE block (a number, k - 1 numbers, or None), or a mapping {layer index: entry}.
    """
    layers = list(layers)
    if betas is None:
        return {layer: None for layer in layers}
    if isinstance(betas, SkipCalibration):
        if list(betas.layers) != layers:
            raise ValueError(
                f"moe_fast: these betas were calibrated for MoE layers {betas.layers}, the model has {layers}"
            )
        betas = betas.betas
    if isinstance(betas, (int, float)) or (isinstance(betas, torch.Tensor) and betas.numel() == 1):
        return {layer: _layer_betas(betas, k, f"layer {layer}") for layer in layers}
    if isinstance(betas, Mapping):
        unknown = sorted(set(int(x) for x in betas) - set(layers))
        if unknown:
            raise ValueError(f"moe_fast: betas given for layers {unknown}, which are not MoE layers {layers}")
        return {layer: _layer_betas(betas.get(layer, betas.get(str(layer))), k, f"layer {layer}") for layer in layers}
    if isinstance(betas, torch.Tensor):
        betas = betas.tolist()
    betas = list(betas)
    if len(betas) != len(layers):
        raise ValueError(
            f"moe_fast: got {len(betas)} betas but the model has {len(layers)} MoE layers; "
            "give one entry per MoE layer (a number, or k - 1 numbers for k > 2)"
        )
    return {layer: _layer_betas(b, k, f"layer {layer}") for layer, b in zip(layers, betas)}


def _as_batches(calibration: Any, batch_size: int) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        ids = calibration
    elif isinstance(calibration, Sequence) and calibration and isinstance(calibration[0], torch.Tensor):
        ids = torch.stack(list(calibration))
    else:
        raise ValueError(
            "moe_fast.calibrate_skipping: calibration must be token ids, a LongTensor [N, L] (or a list of "
            "equal-length [L] tensors); use moe_fast.calibration.load_calibration to make one from a spec"
        )
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise ValueError(f"moe_fast.calibrate_skipping: expected non-empty integer ids [N, L], got {ids.dtype} {tuple(ids.shape)}")
    return list(ids.long().split(batch_size))


def calibrate_skipping(
    model: nn.Module,
    calibration: Any,
    quantile: float = 0.5,
    batch_size: int = 4,
    progress: bool = True,
) -> SkipCalibration:
    """Per-layer (per-slot) beta = quantile of ``w_j / w_0`` over the calibration tokens.

    Args:
        model: any loaded transformers model class of a supported family (patched or not; skipping
            is switched off while measuring, so every layer sees the unskipped model's inputs).
        calibration: token ids, LongTensor [N, L].
        quantile: q in (0, 1); about a fraction q of the tokens skip each slot on this data.

    Returns:
        :class:`SkipCalibration` with the betas and the skip rate measured on the same data.
    """
    from moe_fast import patching  # local: patching imports this module

    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"moe_fast.calibrate_skipping: quantile must be in (0, 1), got {quantile}")
    adapter = get_adapter(model)
    blocks = adapter.moe_blocks(model)
    k = adapter.top_k
    if k < 2:
        raise ValueError("moe_fast.calibrate_skipping: top-k is 1, there is no second expert to skip")
    batches = _as_batches(calibration, batch_size)
    device = next(model.parameters()).device

    ratios: dict[int, list[torch.Tensor]] = {ref.layer: [] for ref in blocks}

    def make_hook(layer: int):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            top = torch.topk(logits.detach().reshape(-1, logits.shape[-1]).float(), k, dim=-1).values
            ratios[layer].append(torch.exp(top[:, 1:].double() - top[:, :1].double()).cpu())

        return hook

    handles = [ref.router.register_forward_hook(make_hook(ref.layer)) for ref in blocks]
    saved = patching.suspend_skipping(model)
    base = adapter.base_model(model)  # runs no head: every model class, same hidden states
    try:
        from tqdm.auto import tqdm

        with torch.inference_mode():
            for batch in tqdm(batches, desc="calibrating skipping", disable=not progress):
                base(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        patching.resume_skipping(model, saved)

    layers, betas, rates, n_tokens = [], [], [], 0
    for ref in blocks:
        r = torch.cat(ratios[ref.layer]).numpy()  # [N, k-1]
        n_tokens = r.shape[0]
        q = np.quantile(r, float(quantile), axis=0)
        # Skipped exactly as the router decides: strictly below the threshold.
        beta = [float(min(max(x, 0.0), 1.0)) for x in np.atleast_1d(q)]
        layers.append(ref.layer)
        betas.append(beta)
        rates.append([float((r[:, j] < beta[j]).mean()) for j in range(k - 1)])
    result = SkipCalibration(layers, betas, rates, float(quantile), int(n_tokens), k)
    log.info("skipping calibrated on %d tokens (quantile %.2f)", n_tokens, quantile)
    log.debug("%s", result.table())  # the commands print the table themselves
    return result
