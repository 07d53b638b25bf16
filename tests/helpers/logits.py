"""Router logits that exercise every sanitizing and tie rule of routing."""

from __future__ import annotations

import math

import torch


def special_logits(T: int, E: int, dtype: torch.dtype = torch.float32, ties: bool = False,
                   device: str = "cpu") -> torch.Tensor:
    """Random logits [T, E]; with T >= 7 the first rows are all NaN, all -inf, all equal, and rows
    with +inf, half -inf, a NaN and a -inf entry; ``ties`` draws small integers (many ties)."""
    x = torch.randint(-2, 3, (T, E)).float() if ties else torch.randn(T, E) * 3
    if T >= 7:
        x[0] = math.nan
        x[1] = -math.inf
        x[2] = 0.5
        x[3, E // 2] = math.inf
        x[4, : (E + 1) // 2] = -math.inf
        x[5, E - 1] = math.nan
        x[6, 0] = -math.inf
    return x.to(dtype).to(device)
