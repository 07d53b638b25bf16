"""Subcommands of ``moe-fast``; each module defines ``register(subparsers)``.

The help texts shared by several commands live here, built from the registries (the built-in
models and corpora), so ``--help`` lists exactly what the commands accept.
"""

from __future__ import annotations

from moe_fast.data.builtin import BUILTIN_CORPORA
from moe_fast.models import builtin_model_specs


def builtin_models_text() -> str:
    """"builtin:small-mixtral, ..." from :data:`moe_fast.models.BUILTIN_MODELS`."""
    return ", ".join(builtin_model_specs())


def builtin_corpora_text() -> str:
    """"builtin:python-prose, ..." from :data:`moe_fast.data.builtin.BUILTIN_CORPORA`."""
    return ", ".join(f"builtin:{name}" for name in BUILTIN_CORPORA)


def model_help() -> str:
    return f"checkpoint directory (hub layout, safetensors), or a model shipped with moe_fast: {builtin_models_text()}"


def calib_help() -> str:
    return (
        f"calibration: .txt, .json/.jsonl (text field), .pt token ids, a built-in corpus ({builtin_corpora_text()}; "
        "its calib split) or a Hugging Face dataset name"
    )
