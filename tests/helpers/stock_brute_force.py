"""Brute force over the families routed by a RoutingSpec: the stock transformers block re-run with
the dropped experts made unroutable by editing its parameters (stock code otherwise).

Shared by the pruning tests of routers other than plain softmax (GLM-4.5, gpt-oss, DeepSeek-V3 with
groups). It shares no code with moe_fast.pruning.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch

from moe_fast.adapters import get_adapter

from helpers.brute_force import BATCH
from helpers.routing_reference import masked_routers


@contextlib.contextmanager
def dropped_in_stock_router(router, family: str, dropped):
    """The stock router with the dropped experts unroutable: the sigmoid routers' selection bias
    (choice only; the weights stay the unbiased scores of the chosen; a group scores its two best
    allowed experts) or gpt-oss' router bias (its logits) at -inf."""
    name = "bias" if family == "gpt_oss" else "e_score_correction_bias"
    tensor = getattr(router, name)
    saved = tensor.detach().clone()
    with torch.no_grad():
        tensor[list(dropped)] = -math.inf
    try:
        yield
    finally:
        with torch.no_grad():
            tensor.copy_(saved)


def block_output(block, x: torch.Tensor) -> torch.Tensor:
    """The stock block on x [T, H] -> [T, H] (gpt-oss' tuple unpacked)."""
    out = block(x.unsqueeze(0))
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, x.shape[-1])


def capture_inputs(model, adapter, ids: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """Per MoE layer, the block input [T, H] of every calibration batch (of the model as it routes now)."""
    store: dict[int, list[torch.Tensor]] = {}
    handles = []
    for ref in adapter.moe_blocks(model):
        def hook(module, args, _layer=ref.layer):
            store.setdefault(_layer, []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
        handles.append(ref.block.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for lo in range(0, ids.shape[0], BATCH):
                model(ids[lo : lo + BATCH])
    finally:
        for h in handles:
            h.remove()
    return store


class StockLayerScores:
    """One layer's brute-force score of any dropped set (cached): the stock block re-run with the
    dropped experts masked, float64 norm (paper) or squared norm (mse) of the change per batch."""

    def __init__(self, ref, family: str, batches: list[tuple[torch.Tensor, torch.Tensor]], objective: str = "paper") -> None:
        self.ref, self.family, self.batches, self.objective = ref, family, batches, objective
        self.cache: dict[tuple, float] = {}

    def __call__(self, dropped: tuple) -> float:
        if dropped not in self.cache:
            total = 0.0
            with torch.no_grad(), dropped_in_stock_router(self.ref.router, self.family, dropped):
                for x, z in self.batches:
                    diff = z.double() - block_output(self.ref.block, x).double()
                    total += float(torch.linalg.norm(diff)) if self.objective == "paper" else float((diff * diff).sum())
            self.cache[dropped] = total
        return self.cache[dropped]


def stock_layer_scores(model, family: str, ids: torch.Tensor, mode: str = "layerwise",
                       kept: dict[int, list[int]] | None = None, objective: str = "paper") -> dict[int, StockLayerScores]:
    """Per MoE layer, a brute-force scorer against the unpruned block's output on the unpruned input.
    Progressive: the block runs on the input of the model masked to ``kept`` (earlier layers' choices)."""
    adapter = get_adapter(model)
    unpruned = capture_inputs(model, adapter, ids)
    inputs = unpruned
    if mode == "progressive":
        with masked_routers(model, adapter, kept):
            inputs = capture_inputs(model, adapter, ids)
    out = {}
    with torch.no_grad():
        for ref in adapter.moe_blocks(model):
            batches = [(x, block_output(ref.block, u)) for x, u in zip(inputs[ref.layer], unpruned[ref.layer])]
            out[ref.layer] = StockLayerScores(ref, family, batches, objective)
    return out


def brute_force(model, family: str, ids: torch.Tensor, candidates: Callable[[], Iterable[tuple]],
                mode: str = "layerwise") -> dict[int, dict[tuple, float]]:
    """Per MoE layer, the paper's loss of every dropped set ``candidates()`` yields. Progressive: each
    layer's inputs come from the model pruned so far (earlier layers masked to their best sets)."""
    adapter = get_adapter(model)
    E = adapter.num_experts
    kept = {ref.layer: list(range(E)) for ref in adapter.moe_blocks(model)}
    losses: dict[int, dict[tuple, float]] = {}
    for ref in adapter.moe_blocks(model):
        score = stock_layer_scores(model, family, ids, mode, kept)[ref.layer]
        vals = {d: score(d) for d in candidates()}
        losses[ref.layer] = vals
        best = min(vals, key=lambda d: (vals[d], d))
        kept[ref.layer] = [e for e in range(E) if e not in best]
    return losses
