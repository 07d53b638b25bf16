"""Per-layer counters of what skipping did inside the engine: tokens, skipped slots, expert rows run.

Why counters: "skipped" must mean "not computed"; ``rows_computed`` counts the (token, expert) rows
handed to vLLM's expert kernels, so a test or benchmark can check it equals tokens x k minus the
skipped slots. Counters live in the process that runs the model (vLLM's engine core: run with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` to read them from the ``vllm.LLM`` process).
"""

from __future__ import annotations

from collections import defaultdict

_COUNTS: dict[int, dict[str, int]] = defaultdict(lambda: {"tokens": 0, "slots": 0, "skipped": 0, "rows_computed": 0})


def add(layer: int, **counts: int) -> None:
    """Adds to one layer's counters."""
    entry = _COUNTS[layer]
    for name, value in counts.items():
        entry[name] += int(value)


def snapshot() -> dict[int, dict[str, int]]:
    """A copy of every layer's counters since the last ``reset``."""
    return {layer: dict(entry) for layer, entry in sorted(_COUNTS.items())}


def reset() -> None:
    """Forgets every counter (e.g. after the engine's warm-up run)."""
    _COUNTS.clear()


def skip_rate(counts: dict[int, dict[str, int]] | None = None) -> float:
    """Skipped slots over the slots that could skip (slots 1..k-1 of every token), over all layers."""
    counts = snapshot() if counts is None else counts
    skippable = sum(c["slots"] - c["tokens"] for c in counts.values())
    return sum(c["skipped"] for c in counts.values()) / skippable if skippable else 0.0
