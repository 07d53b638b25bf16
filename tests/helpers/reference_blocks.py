"""A plain reference of the paper's skipping forward, and inputs on which it is unambiguous.

The reference (the paper's skip rule) is written from the rule itself, not from moe_fast's code:
float64 softmax over all experts, top-k, slot j >= 1 dropped when ``w_j < beta_j * w_0``, the
kept weights renormalized (or, without ``norm_topk_prob``, rescaled to the top-k's sum as in
``moe_fast.reference.route``), then a loop over experts with the stock weights.
tests/serving/test_reference_blocks.py checks it against stock transformers.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from helpers.tiny_models import VOCAB, moe_blocks


def reference_moe_forward(block, hidden: torch.Tensor, betas, renormalize: bool) -> torch.Tensor:
    """The paper's skipping forward of one block: hidden [B, S, H] -> [B, S, H]."""
    B, S, H = hidden.shape
    x = hidden.reshape(-1, H)
    logits = F.linear(x, block.gate.weight)
    k = block.gate.top_k
    probs = torch.softmax(logits.double(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True)  # ties to the lower expert index
    top_p, top_i = order.values[:, :k], order.indices[:, :k]
    keep = torch.ones_like(top_p, dtype=torch.bool)
    if betas is not None:
        beta = torch.tensor(list(betas), dtype=torch.float64)  # slots 1..k-1
        keep[:, 1:] = top_p[:, 1:] >= beta * top_p[:, :1]
    w = torch.where(keep, top_p, torch.zeros_like(top_p))
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    else:
        w = w * (top_p.sum(-1, keepdim=True) / w.sum(-1, keepdim=True))
    experts = block.experts
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for e in range(experts.num_experts):
        tok, slot = torch.nonzero((top_i == e) & keep, as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(x[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = F.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        out.index_add_(0, tok, y.double() * w[tok, slot].unsqueeze(-1))
    out = out.to(hidden.dtype)
    if hasattr(block, "shared_expert"):  # Qwen2-MoE
        out = out + torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    return out.reshape(B, S, H)


@contextlib.contextmanager
def reference_forward(model, betas: dict | None = None):
    """Temporarily runs every sparse block with :func:`reference_moe_forward`.

    betas: {layer: [beta_1..beta_{k-1}] or None}; None everywhere when not given.
    """
    renorm = bool(getattr(model.config, "norm_topk_prob", True)) or model.config.model_type == "mixtral"
    saved = []
    for layer, block in moe_blocks(model):
        b = (betas or {}).get(layer)
        saved.append(block)
        block.forward = types.MethodType(lambda self, h, _b=b: reference_moe_forward(self, h, _b, renorm), block)
    try:
        yield model
    finally:
        for block in saved:
            del block.forward


def block_io(model, ids: torch.Tensor, layer: int, flat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of a layer's MoE block in a forward of ``model`` on ``ids``, float64:
    [N, L, H] each, or [N * L, H] with ``flat``. What the repair tests solve their reference on."""
    seen = {}
    block = model.model.layers[layer].mlp
    h = block.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), z=(o[0] if isinstance(o, tuple) else o).detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    x, z = seen["x"].double(), seen["z"].double()
    return (x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])) if flat else (x, z)


def has_routing_ties(model, ids) -> bool:
    """Whether any token's top-(k+1) router logits tie (bf16 does that): the order there is a convention."""
    found = []

    def hook(module, args, out):
        top = torch.topk(out[0].float(), module.top_k + 1, dim=-1).values
        found.append(bool((top[:, :-1] == top[:, 1:]).any()))

    handles = [block.gate.register_forward_hook(hook) for _, block in moe_blocks(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return any(found)


def tie_free_ids(model, batch: int = 2, length: int = 16, tries: int = 20) -> torch.Tensor:
    """Deterministic random token ids on which the model's routing has no ties."""
    gen = torch.Generator().manual_seed(1234)
    for _ in range(tries):
        ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
        if not has_routing_ties(model, ids):
            return ids
    raise RuntimeError("no tie-free input found")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())
