"""Pruning a tiny model of every supported family in memory: exactly the paper's brute-force
choice, an exact export, and a pruned model that still patches and skips like the reference.

The brute force re-runs the stock transformers block (shared expert and all) once per candidate
dropped set, with that set's router logits at -inf and the family's own routing rule (softmax,
top-k, renormalize only with norm_topk_prob), and sums the per-batch float64 Frobenius norms of
the difference to the unpruned block output. It shares no code with moe_fast.
"""

from __future__ import annotations

import copy
import itertools
import math
import types

import pytest
import torch
import torch.nn.functional as F

import moe_fast
from helpers.reference_blocks import reference_forward, rel_err
from helpers.tiny_models import FAMILIES, VOCAB, moe_blocks, tiny_model

BATCH = 3

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: far faster on one thread


def _masked_router(gate, dropped: tuple, renormalize: bool, float_scores: bool):
    def forward(self, h):
        h = h.reshape(-1, self.hidden_dim)
        logits = F.linear(h, self.weight)
        masked = logits.float().clone()
        masked[:, list(dropped)] = -math.inf
        probs = torch.softmax(masked, dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if renormalize:
            top = top / top.sum(-1, keepdim=True)
        return logits, top if float_scores else top.to(logits.dtype), idx

    return types.MethodType(forward, gate)


class masked:
    """Context: routers of the given layers never pick the dropped experts (stock code otherwise)."""

    def __init__(self, model, dropped_per_layer: dict[int, tuple]):
        self.model, self.dropped = model, dropped_per_layer
        self.renorm = model.config.model_type == "mixtral" or bool(model.config.norm_topk_prob)
        self.float_scores = model.config.model_type == "mixtral"

    def __enter__(self):
        for layer, dropped in self.dropped.items():
            gate = self.model.model.layers[layer].mlp.gate
            gate.forward = _masked_router(gate, tuple(dropped), self.renorm, self.float_scores)
        return self

    def __exit__(self, *exc):
        for layer in self.dropped:
            del self.model.model.layers[layer].mlp.gate.forward


def block_io(model, ids, layer: int):
    """Per batch: (input [1, T, H], output [1, T, H]) of one sparse block."""
    block = model.model.layers[layer].mlp
    out, store = [], {}
    handle = block.register_forward_hook(lambda m, a, o: store.update(x=a[0].clone(), z=o.clone()))
    with torch.no_grad():
        for lo in range(0, ids.shape[0], BATCH):
            model(ids[lo : lo + BATCH])
            out.append((store["x"], store["z"]))
    handle.remove()
    return out


def brute_force(model, ids, keep: int, mode: str):
    """{layer: dropped set}, {layer: {dropped set: loss}} by re-running the block per candidate."""
    E = model.model.layers[moe_blocks(model)[0][0]].mlp.gate.weight.shape[0]
    chosen, losses = {}, {}
    for layer, block in moe_blocks(model):
        targets = block_io(model, ids, layer)
        if mode == "progressive":
            with masked(model, chosen):
                inputs = block_io(model, ids, layer)
        else:
            inputs = targets
        vals = {}
        for dropped in itertools.combinations(range(E), E - keep):
            total = 0.0
            with torch.no_grad(), masked(model, {layer: dropped}):
                for (x, _), (_, z) in zip(inputs, targets):
                    total += float(torch.linalg.norm(z.double() - block(x).double()))
            vals[dropped] = total
        chosen[layer] = min(vals, key=lambda d: (vals[d], d))
        losses[layer] = vals
    return chosen, losses


@pytest.mark.parametrize(
    "family, mode, keep",
    [
        ("mixtral", "layerwise", 6),
        ("qwen2_moe", "layerwise", 6),
        ("qwen2_moe", "progressive", 5),
        ("qwen3_moe", "layerwise", 6),
        ("olmoe", "layerwise", 6),
        ("olmoe", "progressive", 6),
    ],
)
def test_prune_matches_brute_force_and_exports_exactly(family, mode, keep):
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (6, 12), generator=torch.Generator().manual_seed(11))
    chosen, ref_losses = brute_force(model, ids, keep, mode)
    work = copy.deepcopy(model)
    pruned, report = moe_fast.prune(work, ids, keep, mode=mode, search="exhaustive", batch_size=BATCH, progress=False)
    assert sorted(report.layers) == sorted(chosen)
    for layer, vals in ref_losses.items():
        ours = report.layers[layer]
        for dropped, v in vals.items():
            assert ours.loss[",".join(map(str, dropped))] == pytest.approx(v, rel=2e-5, abs=1e-9)
        values = sorted(vals.values())
        if values[1] - values[0] > 1e-5 * values[0]:
            assert tuple(ours.dropped) == chosen[layer], f"layer {layer}"
        chosen[layer] = tuple(ours.dropped)  # a float-level near tie: follow ours for the export check

    # The pruned model (experts removed) computes what the original does with them masked.
    with torch.no_grad():
        with masked(model, chosen):
            want = model(ids).logits
        got = pruned(ids).logits
    for _, block in moe_blocks(pruned):
        assert block.experts.gate_up_proj.shape[0] == keep and block.gate.weight.shape[0] == keep
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_patches_and_skips(family):
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))
    pruned, _ = moe_fast.prune(model, ids, 6, search="exhaustive", batch_size=BATCH, progress=False)
    cal = moe_fast.calibrate_skipping(pruned, ids, progress=False)
    with torch.no_grad():
        stock = pruned(ids).logits
        with reference_forward(pruned, dict(zip(cal.layers, cal.betas))):
            ref = pruned(ids).logits
        moe_fast.patch(pruned)
        no_skip = pruned(ids).logits
        moe_fast.patch(pruned, betas=cal)
        skipping = pruned(ids).logits
    assert rel_err(no_skip, stock) < 1e-5
    assert rel_err(skipping, ref) < 1e-5
