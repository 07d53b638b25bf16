"""moe_fast's vLLM plugin: dynamic expert skipping inside vLLM for checkpoints that record betas.

Registered as a ``vllm.general_plugins`` entry point (pyproject.toml), so ``vllm serve DIR`` and
``vllm.LLM(DIR)`` call :func:`register` in every vLLM process when moe_fast is installed. A
checkpoint whose config.json has no ``moe_fast.skipping`` betas is served exactly as stock vLLM
serves it; one with betas skips in every MoE layer (``layer_hooks``), or fails to load with one
clear error (``record.SkipRecordError``). Counters: ``moe_fast.serving.vllm_plugin.stats``.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """vLLM's entry point: installs the load-time hooks (idempotent; cheap when no record asks)."""
    from moe_fast.serving.vllm_plugin import hooks  # lazy: entry-point discovery imports this package; the hooks load when vLLM registers them

    hooks.install()
