"""Tiny models of each family and a plain reference of the paper's skipping forward.

The reference (the paper's skip rule) is written from the rule itself, not from moe_fast's code:
float64 softmax over all experts, top-k, slot j >= 1 dropped when ``w_j < beta_j * w_0``, the
kept weights renormalized (or, without ``norm_topk_prob``, rescaled to the top-k's sum as in
``moe_fast.reference.route``), then a loop over experts with the stock weights. Other test
files import these helpers; the tests here check the reference itself against stock
transformers (without skipping it must be the stock eager block).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.nn.functional as F

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
VOCAB = 96


def tiny_config(family: str, **overrides):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if family == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **common | dict(num_hidden_layers=3), intermediate_size=40, moe_intermediate_size=24,
            shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
            mlp_only_layers=[1], decoder_sparse_step=1,
        )
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **common, intermediate_size=40, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=4,
            norm_topk_prob=True, head_dim=8,
        )
    elif family == "olmoe":
        cfg = OlmoeConfig(**common, intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, experts_implementation=None, **overrides):
    """A randomly initialized tiny causal LM with clearly separated logits (stable greedy tokens)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25 if "lm_head" in name or "embed" in name else 0.12)
    return model.to(dtype).eval()


def moe_blocks(model):
    """(layer index, block) of every sparse block, found without moe_fast's adapters."""
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


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


@pytest.mark.numerics
@pytest.mark.parametrize("family", FAMILIES)
def test_reference_without_skipping_is_stock_eager(family):
    model = tiny_model(family, experts_implementation="eager")
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        stock = model(ids).logits
        with reference_forward(model):
            ref = model(ids).logits
    assert rel_err(ref, stock) < 1e-5


def test_reference_skipping_changes_the_output():
    model = tiny_model("mixtral", experts_implementation="eager")
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        stock = model(ids).logits
        with reference_forward(model, {0: [0.9], 1: [0.9]}):
            ref = model(ids).logits
    assert rel_err(ref, stock) > 1e-3
