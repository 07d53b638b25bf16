"""The calibration tokens of a pruning run, cut into the batches of the paper's objective.

Each batch is one term of the objective (the Frobenius norm of its reconstruction error), so the
batches, not single sequences, are what data-parallel ranks share.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.data.calibration import calibration_fingerprint, load_calibration
from moe_fast.checkpoint.loading import load_tokenizer
from moe_fast.pruning.distributed import Dist

log = logging.getLogger(__name__)


@dataclass
class CalibrationBatches:
    ids: torch.Tensor  # [n_samples, seq_len] token ids
    batch_size: int
    summary: dict  # the report's "calibration" settings: spec, sizes, seed, fingerprint

    @property
    def num_batches(self) -> int:
        return math.ceil(self.ids.shape[0] / self.batch_size)

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    def batch(self, index: int) -> torch.Tensor:
        """The ids of global batch ``index`` (the last one may be short)."""
        return self.ids[index * self.batch_size : min(self.ids.shape[0], (index + 1) * self.batch_size)]


def load_batches(
    calibration: str | torch.Tensor,
    tokenizer,
    n_samples: int | None,
    seq_len: int | None,
    batch_size: int,
    seed: int,
    limits: tuple[int | None, int | None] = (None, None),
) -> CalibrationBatches:
    """Loads the calibration ids (``moe_fast.data.calibration.load_calibration``) and describes them;
    ``limits`` (the model's vocab size and max_position_embeddings) refuse ids it cannot take."""
    ids = load_calibration(calibration, tokenizer, n_samples, seq_len, seed, *limits)
    n, length = ids.shape
    summary = {
        "spec": calibration if isinstance(calibration, str) else "tensor",
        "n_samples": n, "seq_len": length, "batch_size": batch_size, "seed": seed,
        "fingerprint": calibration_fingerprint(ids),
    }
    return CalibrationBatches(ids, batch_size, summary)


def check_same_on_all_ranks(ctx: Dist, batches: CalibrationBatches) -> None:
    """Collective: every rank must have loaded the same tokens, or their errors would not add up."""
    if len(set(ctx.gather(batches.summary["fingerprint"]))) > 1:
        raise ValueError("the ranks loaded different calibration tokens; give every rank the same --calib and seed")


def needs_tokenizer(calibration: str | torch.Tensor) -> bool:
    """Token ids (a tensor or a ``.pt`` file) need none; text specs do."""
    return not isinstance(calibration, torch.Tensor) and not str(calibration).lower().endswith(".pt")


def find_tokenizer(path: str | None, model: nn.Module | None):
    """The tokenizer in the checkpoint directory (or the loaded model's), or None if it has none."""
    source = path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source or not os.path.isdir(source):
        return None
    return load_tokenizer(source)
