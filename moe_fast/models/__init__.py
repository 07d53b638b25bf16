"""The small MoEs shipped with moe_fast, and model-name resolution for the CLI.

``builtin:small-mixtral`` names the checkpoint in ``moe_fast/models/small_mixtral/`` (8 experts,
top-2) and ``builtin:small-qwen3-moe`` the one in ``moe_fast/models/small_qwen3_moe/`` (a
fine-grained Qwen3-MoE), both trained by :mod:`moe_fast.models.train_small` on the built-in
corpora (each directory's ``training_info.json`` holds the exact command). Anything else is
passed to transformers as a path or hub id.
"""

from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
SMALL_MIXTRAL_DIR = os.path.join(_HERE, "small_mixtral")
SMALL_QWEN3_MOE_DIR = os.path.join(_HERE, "small_qwen3_moe")
BUILTIN_MODELS = {"small-mixtral": SMALL_MIXTRAL_DIR, "small-qwen3-moe": SMALL_QWEN3_MOE_DIR}


def resolve_model(spec: str) -> str:
    """``builtin:NAME`` -> the shipped model's directory; other specs unchanged (a path or hub id)."""
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(BUILTIN_MODELS)}")
        path = BUILTIN_MODELS[name]
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"the built-in model {name!r} is missing from {path!r}; rebuild it with "
                "`python -m moe_fast.models.train_small`"
            )
        return path
    return spec


__all__ = ["SMALL_MIXTRAL_DIR", "SMALL_QWEN3_MOE_DIR", "BUILTIN_MODELS", "resolve_model"]
