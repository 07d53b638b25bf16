"""Dynamic expert skipping: calibrating the per-layer thresholds beta.

The paper's rule (reference.route_spec): slot j >= 1 of a token is skipped when ``w_j < beta_j * w_0``
on the final weights. beta of a layer is the quantile q (default the median) over calibration
tokens of ``w_j / w_0`` (``routing_runtime.skip_ratios``, equal to the spec's
``reference.skip_ratios``, under the family's routing, docs/ROUTING.md), so that about a fraction
q of the tokens skip slot j. What a beta may be and how it is checked: :mod:`moe_fast.serving.betas`.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from moe_fast.serving import patching
from moe_fast.routing import runtime as routing_runtime
from moe_fast.adapters import get_adapter
from moe_fast.serving.betas import SkipCalibration

__all__ = ["calibrate_skipping", "quantile_betas", "SkipCalibration"]

log = logging.getLogger(__name__)


def quantile_betas(ratios: np.ndarray, quantile: float) -> list[float]:
    """The calibration rule: per slot j >= 1, beta_j = the ``quantile`` of w_j / w_0 over the
    tokens (``ratios`` [N, k-1]), clamped to [0, 1]."""
    q = np.quantile(ratios, float(quantile), axis=0)
    return [float(min(max(x, 0.0), 1.0)) for x in np.atleast_1d(q)]


def _as_batches(calibration: Any, batch_size: int) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        ids = calibration
    elif isinstance(calibration, Sequence) and calibration and isinstance(calibration[0], torch.Tensor):
        ids = torch.stack(list(calibration))
    else:
        raise ValueError(
            "moe_fast.calibrate_skipping: calibration must be token ids, a LongTensor [N, L] (or a list of "
            "equal-length [L] tensors); use moe_fast.data.calibration.load_calibration to make one from a spec"
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
    if not 0.0 < float(quantile) < 1.0:
        raise ValueError(f"moe_fast.calibrate_skipping: quantile must be in (0, 1), got {quantile}")
    adapter = get_adapter(model)
    handle = patching.patch_handle(model)  # a patched model: the blocks patch patched
    blocks = handle.blocks if handle is not None else adapter.moe_blocks(model)
    k = adapter.top_k
    if k < 2:
        raise ValueError("moe_fast.calibrate_skipping: top-k is 1, there is no second expert to skip")
    batches = _as_batches(calibration, batch_size)
    device = next(model.parameters()).device

    ratios: dict[int, list[torch.Tensor]] = {ref.layer: [] for ref in blocks}

    def make_hook(layer: int, spec):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            ratios[layer].append(routing_runtime.skip_ratios(logits.detach().reshape(-1, logits.shape[-1]), spec).cpu())

        return hook

    handles = [ref.router.register_forward_hook(make_hook(ref.layer, adapter.routing(ref.block))) for ref in blocks]
    base = adapter.base_model(model)  # runs no head: every model class, same hidden states
    try:
        from tqdm.auto import tqdm

        with handle.skipping_off() if handle is not None else nullcontext(), torch.inference_mode():
            for batch in tqdm(batches, desc="calibrating skipping", disable=not progress):
                base(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    layers, betas, rates, n_tokens = [], [], [], 0
    for ref in blocks:
        r = torch.cat(ratios[ref.layer]).numpy()  # [N, k-1]
        n_tokens = r.shape[0]
        beta = quantile_betas(r, quantile)
        # Skipped exactly as the router decides: strictly below the threshold.
        layers.append(ref.layer)
        betas.append(beta)
        rates.append([float((r[:, j] < beta[j]).mean()) for j in range(k - 1)])
    result = SkipCalibration(layers, betas, rates, float(quantile), int(n_tokens), k)
    log.info("skipping calibrated on %d tokens (quantile %.2f)", n_tokens, quantile)
    log.debug("%s", result.table())  # the commands print the table themselves
    return result
