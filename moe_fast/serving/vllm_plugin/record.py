"""Reading a checkpoint's skipping record for serving: what to skip, or one clear error.

Why strict: a served model that silently runs without skipping (or with half-read betas) looks
fine and is not what was calibrated. Every problem here is a ``SkipRecordError`` that names the
checkpoint and the problem, raised while the engine loads, never at the first request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_fast.adapters import get_adapter
from moe_fast.serving.betas import layer_betas
from moe_fast.checkpoint.config_record import CONFIG_KEY, SKIP_RECORD_VERSION as RECORD_VERSION, SKIPPING_KEY
# moe_fast's families, whose routers vLLM serves through its fused-MoE layer.
SERVED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "kimi_k2", "glm4_moe", "gpt_oss")


class SkipRecordError(ValueError):
    """The checkpoint asks for skipping that this plugin cannot apply exactly."""


@dataclass(frozen=True)
class ServingSkip:
    """One checkpoint's skipping, as the plugin applies it."""

    checkpoint: str
    model_type: str
    top_k: int
    sigmoid: bool  # scores are sigmoids (DeepSeek-V3, GLM-4.5); else the log-ratio is the logit gap
    betas: dict[int, list[float] | None]  # decoder layer index -> k - 1 thresholds (None: no skipping)


def skipping_record(hf_config: Any) -> Any:
    """``config.moe_fast["skipping"]`` of a loaded config (attribute or dict), or None."""
    record = getattr(hf_config, CONFIG_KEY, None)
    return record.get(SKIPPING_KEY) if isinstance(record, dict) else None


def read_serving_skip(hf_config: Any, checkpoint: str) -> ServingSkip | None:
    """The skipping a checkpoint asks for; None when its record has no betas (served as stock)."""
    record = skipping_record(hf_config)
    if record is None:
        return None
    where = f"moe_fast skipping in {checkpoint}/config.json"
    if not isinstance(record, dict) or "betas" not in record:
        raise SkipRecordError(f"{where}: malformed record (a mapping with 'betas' expected), got {record!r}"[:500])
    version = record.get("version", RECORD_VERSION)
    if version != RECORD_VERSION:
        raise SkipRecordError(
            f"{where}: record version {version!r}, this moe_fast reads version {RECORD_VERSION}; "
            "re-run `moe-fast skip` with the installed moe_fast or install the moe_fast that wrote it"
        )
    betas, layers = record["betas"], record.get("layers")
    if betas is None:
        return None
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SERVED_MODEL_TYPES:
        raise SkipRecordError(
            f"{where}: model_type {model_type!r} is not a family the moe_fast vLLM plugin skips in "
            f"(covered: {', '.join(SERVED_MODEL_TYPES)})"
        )
    adapter = get_adapter(hf_config)
    k = adapter.top_k
    if k < 2:
        raise SkipRecordError(f"{where}: top-k is {k}, there is no slot to skip")
    if not isinstance(betas, list) or not isinstance(layers, list) or len(betas) != len(layers):
        raise SkipRecordError(f"{where}: 'betas' and 'layers' must be lists of equal length, got {betas!r} and {layers!r}"[:500])
    per_layer: dict[int, list[float] | None] = {}
    for layer, entry in zip(layers, betas):
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise SkipRecordError(f"{where}: layer {layer!r} is not a decoder layer index")
        try:
            per_layer[layer] = layer_betas(entry, k, f"layer {layer}")
        except ValueError as err:
            raise SkipRecordError(f"{where}: {err}") from None
    scoring = adapter.routing().scoring
    return ServingSkip(str(checkpoint), str(model_type), k, scoring == "sigmoid", per_layer)
