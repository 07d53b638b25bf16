"""Family adapters: ``get_adapter(model_or_config)`` picks the one for a model."""

from __future__ import annotations

from moe_fast.adapters.base import MoEAdapter, MoEBlockRef
from moe_fast.adapters.deepseek_v3 import DeepseekV3Adapter
from moe_fast.adapters.glm4_moe import Glm4MoeAdapter
from moe_fast.adapters.gpt_oss import GptOssAdapter
from moe_fast.adapters.mixtral import MixtralAdapter
from moe_fast.adapters.olmoe import OlmoeAdapter
from moe_fast.adapters.qwen2_moe import Qwen2MoeAdapter
from moe_fast.adapters.qwen3_moe import Qwen3MoeAdapter

ADAPTERS: list[type[MoEAdapter]] = [
    MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekV3Adapter, Glm4MoeAdapter, GptOssAdapter,
]


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
