"""Scoring a selection without writing a checkpoint: the unpruned model with experts masked.

Why masking: a pruned checkpoint routes exactly as the original with the dropped experts'
logits at -inf (that is how ``moe-fast prune`` exports), so the demo can score dozens of
selections on one loaded model instead of exporting and reloading each. Perplexity and the
mean KL divergence from the unpruned model's next-token distribution are taken on the same
windows of each test split.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_fast.adapters import get_adapter
from moe_fast.routing.masked_forward import MaskedForward
from moe_fast.serving.skipping import quantile_betas


@contextlib.contextmanager
def masked(model: nn.Module, kept: dict[int, list[int]] | None = None, betas: dict[int, list[float]] | None = None):
    """Within the block, every MoE block routes only among ``kept[layer]`` (and skips by ``betas``)."""
    adapter = get_adapter(model)
    blocks = {}
    for ref in adapter.moe_blocks(model):
        blocks[ref.layer] = MaskedForward(adapter, ref.block, None if kept is None else kept[ref.layer],
                                          None if betas is None else betas.get(ref.layer))
        ref.block.forward = blocks[ref.layer]
    try:
        yield blocks
    finally:
        for ref in adapter.moe_blocks(model):
            del ref.block.forward


@dataclass
class Reference:
    """The unpruned model's next-token log-probabilities on one split's windows."""

    windows: torch.Tensor  # [n, L] token ids
    logprobs: list[torch.Tensor]  # per batch [b, L - 1, V] float32
    routing: list[list[float]]  # per MoE layer: fraction of top-k slots per expert (stock model)


@torch.inference_mode()
def reference(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> Reference:
    """The stock (unpatched) model's log-probabilities and routing histogram on ``windows``."""
    adapter = get_adapter(model)
    E, k = adapter.num_experts, adapter.top_k
    parts, counts = [], None
    for batch in windows.split(batch_size):
        out = model(input_ids=batch, use_cache=False, output_router_logits=True)
        parts.append(torch.log_softmax(out.logits[:, :-1].float(), -1))
        hist = torch.stack([
            torch.bincount(lg.float().topk(k, -1).indices.reshape(-1), minlength=E).double() for lg in out.router_logits
        ])
        counts = hist if counts is None else counts + hist
    routing = (counts / counts.sum(-1, keepdim=True)).tolist() if counts is not None else []
    return Reference(windows, parts, routing)


@torch.inference_mode()
def perplexity_and_kl(model: nn.Module, ref: Reference, batch_size: int = 8) -> tuple[float, float]:
    """(perplexity, mean KL(unpruned || this model) in nats per token) on the reference windows."""
    nll, kl, count = 0.0, 0.0, 0
    for i, x in enumerate(ref.windows.split(batch_size)):
        logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[:, :-1].float(), -1)
        target = x[:, 1:]
        nll -= float(logp.gather(-1, target.unsqueeze(-1)).sum())
        p_ref = ref.logprobs[i]
        kl += float((p_ref.exp() * (p_ref - logp)).sum())
        count += target.numel()
    return math.exp(nll / count), kl / count


@torch.inference_mode()
def skip_betas(model: nn.Module, kept: dict[int, list[int]] | None, ids: torch.Tensor, quantile: float = 0.5,
               batch_size: int = 8) -> dict[int, list[float]]:
    """Per MoE layer and slot j >= 1: the ``quantile`` of w_j / w_0 over ``ids``, among kept experts.

    The same rule as :func:`moe_fast.calibrate_skipping` on the pruned checkpoint
    (:func:`moe_fast.serving.skipping.quantile_betas`): ratios of the (unskipped) routing weights, each
    layer seeing the inputs of the pruned, unskipped model.
    """
    ratios: dict[int, list[torch.Tensor]] = {}
    with masked(model, kept) as blocks:
        def recorder(layer: int, block: MaskedForward):
            def call(hidden_states, *args, **kwargs):
                r = block.route(hidden_states.reshape(-1, hidden_states.shape[-1]))
                w = r.weights.double()
                ratios.setdefault(layer, []).append((w[:, 1:] / w[:, :1]).cpu())
                return block(hidden_states, *args, **kwargs)
            return call

        for layer, block in blocks.items():
            block.block.forward = recorder(layer, block)
        base = get_adapter(model).base_model(model)
        for batch in ids.split(batch_size):
            base(input_ids=batch, use_cache=False)
    return {layer: quantile_betas(torch.cat(parts).numpy(), quantile) for layer, parts in ratios.items()}


def pruned_weight_bytes(model: nn.Module, num_keep: int, bytes_per_param: int = 2) -> int:
    """Bytes of a checkpoint keeping ``num_keep`` experts per MoE layer (router rows and expert weights
    of the others removed), at ``bytes_per_param`` (the shipped models are float16)."""
    adapter = get_adapter(model)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    E = adapter.num_experts
    for ref in adapter.moe_blocks(model):
        per_expert = sum(p.numel() for p in ref.experts.parameters()) // E + ref.router.weight.shape[1]
        total -= (E - num_keep) * per_expert
    return total * bytes_per_param
