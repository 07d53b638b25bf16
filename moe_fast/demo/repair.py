"""The demo's repair rows: ``moe_fast.prune(..., repair=...)`` on a copy of the loaded model.

Why a copy: ``prune`` on a loaded model prunes it in place (r experts per layer, repaired weights
written into them), and the demo keeps scoring the unpruned model with experts masked. The small
shipped models copy in milliseconds, so no checkpoint is written or read.

Why a smaller calibration than the selections': a repair run repeats its layer's selection and adds
its own passes (least squares: statistics and a check; merge: statistics and one check per merge
strength), and the demo runs one per repair and calibration sample. On the first
``Settings.repair_samples`` sequences of each sample (16 of 128 by default: 4096 tokens) the six runs
fit in the demo's 10-minute budget with the rest (the selection inside ``prune`` then also sees those
16 sequences only, so it may differ from the demo's 128-sequence row); report.json records
``repair_samples`` and each layer's calibration loss before and after the repair.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.demo.selection import Selection, _freeze
from moe_fast.pruning import prune


@dataclass
class Repaired:
    """A repaired, pruned copy of the model and what the repair did."""

    selection: Selection  # method "<search> + <repair>", the experts kept (original indices)
    model: nn.Module  # r experts per MoE layer, repaired weights in place
    layers: dict[int, dict]  # per MoE layer: loss before / after the repair, reverted, ridge or strength


def repair_search(searches: tuple[str, ...]) -> str:
    """The selection the repairs run on: the run's first reconstruction search (exhaustive for 8
    experts; greedy for wide models, where beam ties it within the spread at the middle r and costs
    several times more inside ``prune``)."""
    return searches[0]


def repaired_model(
    model: nn.Module, ids: torch.Tensor, num_keep: int, repair: str, search: str, calib: str, seed: int,
    batch_size: int = 8, beam_width: int = 4,
) -> Repaired:
    """Layer-wise reconstruction pruning to ``num_keep`` experts with ``repair`` on ``ids``, through
    ``moe_fast.prune`` on a deep copy of ``model`` (the model itself is not touched)."""
    copied = copy.deepcopy(model)
    result = prune(
        copied, ids, num_keep, mode="layerwise", search=search, beam_width=beam_width, batch_size=batch_size,
        repair=repair, progress=False,
    )
    name = "layer-wise" if search == "exhaustive" else search
    selection = Selection(f"{name} + {repair}", num_keep, calib, seed, _freeze(result.report.kept))
    layers = {}
    for layer, res in sorted(result.report.layers.items()):
        rep = res.repair or {}
        layers[layer] = {key: rep.get(key) for key in ("loss_before", "loss_after", "reverted", "ridge_scale", "strength")}
    return Repaired(selection, result.model.eval(), layers)
