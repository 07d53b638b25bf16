"""The calibration hidden states carried past the finished layers, saved beside the progress.

Why: a resumed run must continue exactly where the killed one stopped. Recomputing the finished
layers' outputs with another forward (the stock block instead of the recorder that carried them)
rounds differently in float16 / bfloat16, and the later layers' losses and even selections moved.
So after every finished MoE layer each rank saves the states it carries (the unpruned stream and,
progressive, the pruned one) to ``states-<next layer>.rank<r>.pt`` in the partial folder, and a
resume loads them instead of replaying: bit for bit the uninterrupted run's inputs. On disk that
is one copy of the carried states per rank (n_samples x seq_len x hidden x dtype bytes per
stream: 2 GiB for 128 x 2048 tokens of Mixtral-8x7B in bf16, twice that progressive), plus the
next one while it is written.
"""

from __future__ import annotations

import glob
import logging
import os

import torch

from moe_fast.pruning.hidden_states import HiddenStates

log = logging.getLogger(__name__)


def states_path(folder: str, next_layer: int, rank: int) -> str:
    return os.path.join(folder, f"states-{next_layer}.rank{rank}.pt")


def save_states(folder: str, next_layer: int, rank: int, stream: HiddenStates) -> None:
    """Writes this rank's carried states (the input of layer ``next_layer``) in one rename."""
    os.makedirs(folder, exist_ok=True)
    path = states_path(folder, next_layer, rank)
    tmp = path + ".tmp"
    record = {"next_layer": next_layer, "batches": [b for b, _ in stream.batches],
              "unpruned": stream.unpruned, "pruned": stream.pruned}
    torch.save(record, tmp)
    os.replace(tmp, path)


def remove_other_states(folder: str, next_layer: int, rank: int) -> None:
    """Removes this rank's states files other than ``next_layer``'s (after progress.json names it)."""
    keep = states_path(folder, next_layer, rank)
    for path in glob.glob(os.path.join(folder, f"states-*.rank{rank}.pt*")):
        if path != keep:
            os.unlink(path)


def load_states(folder: str, next_layer: int, rank: int, stream: HiddenStates) -> dict | None:
    """This rank's saved states for ``next_layer`` when they fit ``stream`` (same batches, shapes
    and dtype), else None with the reason logged (the caller then replays)."""
    path = states_path(folder, next_layer, rank)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        log.warning("resume: %s is missing", path)
        return None
    except Exception as err:  # noqa: BLE001 - a cut or foreign file: replay instead
        log.warning("resume: %s is unreadable (%s: %s)", path, type(err).__name__, err)
        return None
    expect = {"next_layer": next_layer, "batches": [b for b, _ in stream.batches]}
    fits = isinstance(record, dict) and all(record.get(k) == v for k, v in expect.items())
    for name in ("unpruned", "pruned"):
        mine, saved = getattr(stream, name), record.get(name) if isinstance(record, dict) else None
        if mine is None:
            fits = fits and saved is None
        else:
            fits = fits and isinstance(saved, torch.Tensor) and saved.shape == mine.shape and saved.dtype == mine.dtype
    if not fits:
        log.warning("resume: %s was saved by a run with other calibration batches or shapes", path)
        return None
    return record


def restore(stream: HiddenStates, record: dict) -> None:
    """Puts loaded states into ``stream`` (on its device)."""
    stream.unpruned.copy_(record["unpruned"])
    if stream.pruned is not None:
        stream.pruned.copy_(record["pruned"])
