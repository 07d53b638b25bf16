"""Plain references for the families routed by a RoutingSpec (DeepSeek-V3, GLM-4.5, gpt-oss):
the skipping forward of one block written from the rule itself, and the unpruned model with a
keep set masked (what a pruned checkpoint must reproduce).

The skipping reference follows transformers' routers step by step (sigmoid scores, selection
bias, groups by the sum of their two best biased scores, top-k; or gpt-oss' top-k softmax), then
the paper's rule on the final weights: slot j >= 1 dropped when ``w_j < beta_j * w_0``, the
survivors rescaled to the sum the k weights had, and a loop over experts written from the
transformers experts' code. Like moe_fast, the sigmoid is taken in float32 and the ratio test in
float64, so that thresholds equal to a calibration ratio decide the same way.
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from moe_fast import reference


def _choose(block, x: torch.Tensor, family: str):
    """ids [T, k] (slot 0 first), final weights before skipping [T, k] float64, ratios w_j / w_0."""
    if family == "gpt_oss":
        router = block.router
        logits = F.linear(x, router.weight, router.bias).float()
        top_l, ids = torch.sort(logits, dim=-1, descending=True, stable=True)
        top_l, ids = top_l[:, : router.top_k], ids[:, : router.top_k]
        w = torch.softmax(top_l.double(), dim=-1)
        return ids, w, w / w[:, :1]
    router = block.gate
    logits = F.linear(x.float(), router.weight.float())
    s = torch.sigmoid(logits)
    choice = s + router.e_score_correction_bias
    T, E = choice.shape
    G = router.num_group
    group_score = choice.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
    groups = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, : router.topk_group]
    eligible = torch.zeros(T, G, dtype=torch.bool).scatter_(1, groups, True).repeat_interleave(E // G, dim=1)
    ids = torch.sort(choice.masked_fill(~eligible, float("-inf")), dim=-1, descending=True, stable=True).indices
    ids = ids[:, : router.top_k]
    top = torch.gather(s, -1, ids).double()
    w = top / (top.sum(-1, keepdim=True) + 1e-20) if router.norm_topk_prob else top
    return ids, w * router.routed_scaling_factor, torch.exp(torch.log(top) - torch.log(top[:, :1]))


def _expert(block, family: str, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = block.experts
    if family == "gpt_oss":  # GptOssExperts.forward, one expert
        gate_up = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=ex.limit)
        up = up.clamp(min=-ex.limit, max=ex.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * ex.alpha)) @ ex.down_proj[e] + ex.down_proj_bias[e]
    gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
    return F.linear(ex.act_fn(gate) * up, ex.down_proj[e])


def reference_skip_forward(block, hidden: torch.Tensor, betas, family: str) -> torch.Tensor:
    """One block's skipping forward: hidden [B, S, H] -> [B, S, H] (gpt-oss' block: a tuple, as stock)."""
    B, S, H = hidden.shape
    x = hidden.reshape(-1, H)
    ids, w, ratio = _choose(block, x, family)
    keep = torch.ones_like(w, dtype=torch.bool)
    if betas is not None:
        keep[:, 1:] = ratio[:, 1:] >= torch.tensor(list(betas), dtype=torch.float64)
    kept = w.masked_fill(~keep, 0.0)
    kept = kept * (w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for e in range(block.experts.num_experts):
        tok, slot = torch.nonzero((ids == e) & keep, as_tuple=True)
        if tok.numel():
            out.index_add_(0, tok, _expert(block, family, e, x[tok]).double() * kept[tok, slot].unsqueeze(-1))
    out = out.to(hidden.dtype)
    if family != "gpt_oss":
        out = out + block.shared_experts(x)
        return out.reshape(B, S, H)
    return out.reshape(B, S, H), None


@contextlib.contextmanager
def reference_skip_model(model, family: str, betas: dict):
    """Temporarily runs every sparse block with :func:`reference_skip_forward` (betas {layer: [..]})."""
    saved = []
    for i, layer in enumerate(model.model.layers):
        block = layer.mlp
        if not hasattr(block, "experts"):
            continue
        saved.append(block)
        block.forward = types.MethodType(lambda self, h, _b=betas.get(i): reference_skip_forward(self, h, _b, family), block)
    try:
        yield model
    finally:
        for block in saved:
            del block.forward


@contextlib.contextmanager
def masked_routers(model, adapter, keep: dict[int, list[int]]):
    """The unpruned model routing as ``reference.route_spec`` with the experts outside ``keep[layer]``
    masked; the stock experts run the result (ids and weights in the stock router's dtypes)."""
    saved = []
    for ref in adapter.moe_blocks(model):
        mask = torch.zeros(adapter.num_experts, dtype=torch.bool)
        mask[keep[ref.layer]] = True
        spec = adapter.routing(ref.block)

        def forward(self, h, _spec=spec, _mask=mask):
            logits = adapter.compute_router_logits(self, h.reshape(-1, self.hidden_dim))
            routed = reference.route_spec(logits, _spec, keep_mask=_mask)
            return logits, routed.weights.to(logits.dtype), routed.ids.long()

        ref.router.forward = types.MethodType(forward, ref.router)
        saved.append(ref.router)
    try:
        yield model
    finally:
        for router in saved:
            del router.forward
