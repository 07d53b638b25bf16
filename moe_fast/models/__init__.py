"""The small MoEs shipped with moe_fast, and model-name resolution for the CLI.

``builtin:small-mixtral`` names the checkpoint in ``moe_fast/models/small_mixtral/`` (8 experts,
top-2) and ``builtin:small-qwen3-moe`` the one in ``moe_fast/models/small_qwen3_moe/`` (a
fine-grained Qwen3-MoE), both trained by ``scripts/train_small_models.py`` on the built-in
corpora (each directory's ``training_info.json`` holds the exact command). Anything else is
passed to transformers as a path or hub id.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

_HERE = os.path.dirname(os.path.abspath(__file__))
SMALL_MIXTRAL_DIR = os.path.join(_HERE, "small_mixtral")
SMALL_QWEN3_MOE_DIR = os.path.join(_HERE, "small_qwen3_moe")
BUILTIN_MODELS = {"small-mixtral": SMALL_MIXTRAL_DIR, "small-qwen3-moe": SMALL_QWEN3_MOE_DIR}


def builtin_model_specs() -> list[str]:
    """The names the commands accept for the shipped models: ``builtin:<key of BUILTIN_MODELS>``."""
    return [f"builtin:{name}" for name in BUILTIN_MODELS]


def resolve_model(spec: str) -> str:
    """``builtin:NAME`` -> the shipped model's directory; other specs unchanged (a path or hub id)."""
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(builtin_model_specs())}")
        path = BUILTIN_MODELS[name]
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"the built-in model {name!r} is missing from {path!r}; rebuild it with "
                "`python scripts/train_small_models.py`"
            )
        return path
    return spec


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hides transformers' "Loading weights" progress bar while moe_fast loads a model itself.

    Why: a command loads models as internal steps (the demo about 26 times), and a bar per load
    buries the command's own progress. Other bars (hub downloads) stay.
    """
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:  # older transformers: all of its bars off for the duration
        was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was_on:
                hf_logging.enable_progress_bar()
        return
    previous = None

    def hook(factory, args, kwargs):
        if kwargs.get("desc") == "Loading weights":
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = set_hook(hook)
    try:
        yield
    finally:
        set_hook(previous)


__all__ = [
    "SMALL_MIXTRAL_DIR", "SMALL_QWEN3_MOE_DIR", "BUILTIN_MODELS", "builtin_model_specs", "quiet_loading", "resolve_model",
]
