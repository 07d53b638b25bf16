"""The small Mixtral shipped with moe_fast, and model-name resolution for the CLI.

``builtin:small-mixtral`` names the checkpoint in ``moe_fast/models/small_mixtral/`` (trained
by :mod:`moe_fast.models.train_small` on the built-in corpora; see its docstring for the
command). Anything else is passed to transformers as a path or hub id.
"""

from __future__ import annotations

import os

SMALL_MIXTRAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "small_mixtral")
BUILTIN_MODELS = {"small-mixtral": SMALL_MIXTRAL_DIR}


def resolve_model(spec: str) -> str:
    """``builtin:small-mixtral`` -> its directory; other specs unchanged (a path or hub id)."""
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


__all__ = ["SMALL_MIXTRAL_DIR", "BUILTIN_MODELS", "resolve_model"]
