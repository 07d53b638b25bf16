"""transformers' routers as the benchmarks' baselines, from the router logits on (the gate matmul
is the same for both sides and left out), each followed by its experts' one_hot/where dispatch.

Copied from transformers 5.x so that every benchmark times the same baseline code.
"""

from __future__ import annotations

import torch


def one_hot_dispatch(idx: torch.Tensor, num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The index work of MixtralExperts / DeepseekV3Experts.forward: per hit expert, (slot, token)."""
    mask = torch.nn.functional.one_hot(idx, num_classes=num_experts + 1).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    return [torch.where(mask[e[0]]) for e in hit if e[0] != num_experts]


def deepseek_v3_route_dispatch(
    logits: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    k: int,
    scaling: float,
    norm_topk_prob: bool = True,
):
    """DeepseekV3TopkRouter.forward after its F.linear, then DeepseekV3Experts' dispatch."""
    E = logits.shape[1]
    scores = logits.float().sigmoid()
    scores_for_choice = scores + bias
    group_scores = scores_for_choice.view(-1, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if norm_topk_prob:
        topk_weights /= topk_weights.sum(dim=-1, keepdim=True) + 1e-20
    topk_weights = topk_weights * scaling
    return topk_weights, topk_indices, one_hot_dispatch(topk_indices, E)
