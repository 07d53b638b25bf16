"""This rank's calibration hidden states, carried from one decoder layer to the next.

Layer-wise pruning carries one stream, the unpruned model's. Progressive pruning carries a
second one, the model pruned so far: its block inputs are what the search scores, while its
target stays the unpruned block's output on the unpruned stream.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from moe_fast.pruning.calibration_batches import CalibrationBatches
from moe_fast.pruning.source import LayerSource

BlockForward = Callable[..., torch.Tensor]


class HiddenStates:
    """The hidden states of this rank's calibration batches ([rows, seq, H], batches in order)."""

    def __init__(self, source: LayerSource, calib: CalibrationBatches, batch_indices: list[int], progressive: bool) -> None:
        parts = [calib.batch(b) for b in batch_indices]
        self.source, self.batch_size = source, calib.batch_size
        self.num_sequences = int(calib.ids.shape[0])  # over every rank's batches
        self.unpruned = torch.cat([source.embed(p) for p in parts]).to(source.dtype)
        self.pruned = self.unpruned.clone() if progressive else None
        self.batches: list[tuple[int, slice]] = []  # (global batch index, its rows here)
        pos = 0
        for b, p in zip(batch_indices, parts):
            self.batches.append((b, slice(pos, pos + p.shape[0])))
            pos += p.shape[0]
        self._kwargs: dict[int, dict] = {}

    @property
    def progressive(self) -> bool:
        return self.pruned is not None

    def kwargs(self, rows: slice, layer: nn.Module | None = None) -> dict:
        """``layer``'s call arguments (positions, rotary, its attention type's mask) for ``rows``
        sequences, made once per size (``layer`` None: as the adapter builds them for every layer)."""
        n = rows.stop - rows.start
        if n not in self._kwargs:
            self._kwargs[n] = self.source.layer_kwargs(self.unpruned[:n])
        if layer is None:
            return self._kwargs[n]
        return self.source.adapter.layer_kwargs_for(self._kwargs[n], layer)

    def record(self, layer: nn.Module, block: nn.Module, recorder) -> None:
        """Passes every batch through ``layer`` with ``recorder`` as ``block``'s forward; the
        recorder returns the unpruned block output, so the unpruned stream moves on past the layer.
        Progressive, the recorder sees the pruned stream's block input, against the unpruned
        block's output on the unpruned stream as target."""
        for b, rows in self.batches:
            recorder.group_id = b  # global batch index: one term of the paper's sum
            if self.pruned is None:
                with patched_forward(block, recorder):
                    self.unpruned[rows] = layer_output(layer(self.unpruned[rows], **self.kwargs(rows, layer)))
                continue
            target, self.unpruned[rows] = block_output(layer, block, self.unpruned[rows], self.kwargs(rows, layer))
            recorder.target = target.reshape(-1, target.shape[-1])
            with patched_forward(block, recorder):
                layer(self.pruned[rows], **self.kwargs(rows, layer))  # only the block's input counts: output unused
            recorder.target = None

    def forward_unpruned(self, layer: nn.Module) -> None:
        _forward_layer(layer, self.unpruned, lambda rows: self.kwargs(rows, layer), self.batch_size)

    def forward_pruned(self, layer: nn.Module, block: nn.Module | None, pruned_block: BlockForward | None) -> None:
        """Progressive only: the pruned stream passes ``layer``, with ``pruned_block`` as the
        block's forward (None: a dense layer, or a block left whole)."""
        if block is None or pruned_block is None:
            _forward_layer(layer, self.pruned, lambda rows: self.kwargs(rows, layer), self.batch_size)
            return
        with patched_forward(block, pruned_block):
            _forward_layer(layer, self.pruned, lambda rows: self.kwargs(rows, layer), self.batch_size)


@contextlib.contextmanager
def patched_forward(module: nn.Module, forward: BlockForward) -> Iterator[None]:
    """Replaces a module's forward (an instance attribute) for the block, restoring what was there."""
    previous = module.__dict__.get("forward")  # an instance-level forward set by others
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def layer_output(out) -> torch.Tensor:
    """The hidden states of a decoder layer's output (some layers return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def block_output(layer: nn.Module, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the unpruned block's output inside ``layer``, the layer's output) on ``hidden``."""
    captured = {}

    def hook(module, args, output):
        captured["z"] = output[0] if isinstance(output, tuple) else output

    handle = block.register_forward_hook(hook)
    try:
        out = layer_output(layer(hidden, **kwargs))
    finally:
        handle.remove()
    return captured["z"], out


def _forward_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: Callable[[slice], dict], batch_size: int) -> None:
    """hidden <- layer(hidden), in place, one calibration batch at a time."""
    for lo in range(0, hidden.shape[0], batch_size):
        rows = slice(lo, min(hidden.shape[0], lo + batch_size))
        hidden[rows] = layer_output(layer(hidden[rows], **kwargs(rows)))
