"""What a beta argument may be: a number, a sequence of numbers or a tensor, read in one place.

Why a module of its own, beside the ops: ``ops.route``, the specification (``reference``) and the
per-layer checks (``betas``) all take betas, and the ops sit below everything else.
"""

from __future__ import annotations

from typing import Sequence

import torch


def beta_entries(beta: float | Sequence[float] | torch.Tensor | None) -> list | None:
    """beta's entries as a flat list, unconverted (a number is one entry); None stays None.

    The one reading of what a beta may be: a number, a sequence or a tensor (the ops, the spec and
    the per-layer checks below all read betas through it). The C++ side of the rule (count and
    range checks, -log) is ``skip_gaps_from_beta`` in csrc/include/moe_fast/rules.h.
    """
    if beta is None:
        return None
    if isinstance(beta, torch.Tensor):
        return beta.reshape(-1).tolist()
    if isinstance(beta, (int, float)):
        return [beta]
    entries = None if isinstance(beta, (str, bytes)) else list(beta)
    if entries is None or any(isinstance(b, (str, bytes)) for b in entries):
        # A string is a sequence of characters: "0.5" would be read as the betas "0", ".", "5".
        raise ValueError(f"beta must be a number, a sequence of numbers or a tensor, got {beta!r} (a string is not a number)")
    return entries


def beta_values(beta: float | Sequence[float] | torch.Tensor | None) -> list[float] | None:
    """beta as a list of floats (one for every slot, or one per slot 1..k-1); None stays None."""
    entries = beta_entries(beta)
    return None if entries is None else [float(b) for b in entries]


def per_slot(values: list, k: int) -> list:
    """One value for every slot 1..k-1: a single value stands for all of them (at least one slot)."""
    return values * max(k - 1, 1) if len(values) == 1 else values
