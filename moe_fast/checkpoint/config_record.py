"""moe_fast's entry in a checkpoint's config.json: ``"moe_fast": {"pruning": ..., "skipping": ...}``.

Why one home: pruning writes its part, skipping its own, and each must keep the other's; stock
transformers ignores the entry, so the checkpoint still loads anywhere.
"""

from __future__ import annotations

from typing import Any

CONFIG_KEY = "moe_fast"  # the config attribute / config.json key
PRUNING_KEY = "pruning"  # {"criterion" or "mode", "keep", "kept", ...}: written by export
SKIPPING_KEY = "skipping"  # {"betas": per MoE layer or None, "layers": [...], "version": 1, ...}: written by patch
SKIP_RECORD_VERSION = 1  # the skipping record's layout; a record without "version" (older moe_fast) is 1


def merged_record(existing: Any, key: str, value: Any) -> dict:
    """A copy of the record ``existing`` (a dict, or anything else for none) with ``key`` set."""
    record = dict(existing) if isinstance(existing, dict) else {}
    record[key] = value
    return record


def set_record_entry(config: Any, key: str, value: Any) -> None:
    """Sets ``config.moe_fast[key]`` on a transformers config, keeping the record's other parts."""
    setattr(config, CONFIG_KEY, merged_record(getattr(config, CONFIG_KEY, None), key, value))


def remove_record_entry(config: Any, key: str) -> None:
    """Removes ``config.moe_fast[key]``, and the record itself when nothing else is left in it."""
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict):
        return
    record = {name: value for name, value in record.items() if name != key}
    if record:
        setattr(config, CONFIG_KEY, record)
    else:
        delattr(config, CONFIG_KEY)


def record_entry(config: Any, key: str) -> Any:
    """``config.moe_fast[key]``, or None when the config has no such entry."""
    record = getattr(config, CONFIG_KEY, None)
    return record.get(key) if isinstance(record, dict) else None


def has_record_entry(config: Any, key: str) -> bool:
    record = getattr(config, CONFIG_KEY, None)
    return isinstance(record, dict) and key in record
