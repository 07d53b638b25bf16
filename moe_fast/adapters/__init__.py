"""Family adapters: ``get_adapter(model_or_config)`` picks the one for a model.

A family is one module in this package with a ``MoEAdapter`` subclass that names its
``model_types``: every module here is imported and its adapters registered, so adding a family
does not touch this file (docs/ARCHITECTURE.md, "A new model family").
"""

from __future__ import annotations

import importlib
import pkgutil

from moe_fast.adapters.base import MoEAdapter, MoEBlockRef
from moe_fast.adapters.deepseek_v3 import DeepseekV3Adapter
from moe_fast.adapters.glm4_moe import Glm4MoeAdapter
from moe_fast.adapters.gpt_oss import GptOssAdapter
from moe_fast.adapters.mixtral import MixtralAdapter
from moe_fast.adapters.olmoe import OlmoeAdapter
from moe_fast.adapters.qwen2_moe import Qwen2MoeAdapter
from moe_fast.adapters.qwen3_moe import Qwen3MoeAdapter



def _discover() -> list[type[MoEAdapter]]:
    """The adapter classes defined in this package's modules, by module name (classes without
    ``model_types``, such as shared bases, serve no family by themselves)."""
    found: list[type[MoEAdapter]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, MoEAdapter) and obj.model_types
                    and obj.__module__ == module.__name__ and obj not in found):
                found.append(obj)
    return found


ADAPTERS: list[type[MoEAdapter]] = _discover()


def register_adapter(cls: type[MoEAdapter]) -> type[MoEAdapter]:
    """Adds a family (usable as a class decorator)."""
    if cls not in ADAPTERS:
        ADAPTERS.append(cls)
    return cls


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def get_adapter(model_or_config) -> MoEAdapter:
    """The adapter for a transformers model or config; a clear error for unsupported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(config)
    raise ValueError(
        f"moe_fast does not support model_type {model_type!r}; supported MoE families: "
        f"{', '.join(supported_model_types())}"
    )


__all__ = [
    "MoEAdapter",
    "MoEBlockRef",
    "MixtralAdapter",
    "Qwen2MoeAdapter",
    "Qwen3MoeAdapter",
    "OlmoeAdapter",
    "DeepseekV3Adapter",
    "Glm4MoeAdapter",
    "GptOssAdapter",
    "get_adapter",
    "register_adapter",
    "supported_model_types",
]
