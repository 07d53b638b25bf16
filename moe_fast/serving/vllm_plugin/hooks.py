"""Where the plugin enters vLLM: engine config creation (checks) and MoE layer construction (skipping).

Why two hooks: the engine's config is made in the process that calls ``vllm.LLM`` or ``vllm serve``,
so a bad record fails there with its own message; the model (and its MoE runners) is built in the
engine-core process, where each runner is wrapped as it is constructed (``layer_hooks.attach``).
A third hook keeps vLLM's compiled mode honest: ``VllmConfig.compute_hash`` (the key of vLLM's
torch.compile cache) of a skipping checkpoint gets a moe_fast factor, so that a graph compiled for the
same checkpoint without the plugin (where Dynamo inlined the MoE layers, no skipping) is never
loaded from the cache when the plugin serves it, nor the other way round.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from moe_fast.serving.vllm_plugin.layer_hooks import attach
from moe_fast.serving.vllm_plugin.record import ServingSkip, SkipRecordError, read_serving_skip

_INSTALLED = False
# Changes whenever what a skipping layer's compiled graph contains changes (layer_hooks.opaque_entry).
COMPILE_FACTOR = "moe_fast.serving.vllm_plugin skipping: MoE layers entered through torch.ops.vllm.moe_forward (v1)"
_CACHE: dict[int, tuple[Any, ServingSkip | None, set[int]]] = {}


def _skip_for(model_config: Any) -> tuple[ServingSkip | None, set[int]]:
    """The checkpoint's skipping (read once per config object) and the layers attached so far."""
    hf_config = model_config.hf_config
    cached = _CACHE.get(id(hf_config))
    if cached is None or cached[0] is not hf_config:
        cached = (hf_config, read_serving_skip(hf_config, str(model_config.model)), set())
        _CACHE[id(hf_config)] = cached
    return cached[1], cached[2]


def install() -> None:
    """Wraps ``EngineArgs.create_engine_config``, ``MoERunner.__init__`` and ``VllmConfig.compute_hash`` once per process."""
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.engine.arg_utils import EngineArgs

    try:
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
    except ImportError as err:  # another vLLM layout: refuse checkpoints that skip, serve the rest as stock
        MoERunner, missing_runner = None, err
    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(create_engine_config)
    def checked_create_engine_config(self, *args, **kwargs):
        config = create_engine_config(self, *args, **kwargs)
        skip, _ = _skip_for(config.model_config)  # a bad record: SkipRecordError here, before any process starts
        if skip is not None and MoERunner is None:
            raise SkipRecordError(
                f"moe_fast skipping in {skip.checkpoint}: this vLLM has no MoERunner to hook ({missing_runner}); "
                "the plugin is tested with vLLM 0.32 and will not serve a skipping checkpoint without skipping"
            )
        return config

    runner_init = MoERunner.__init__ if MoERunner is not None else None

    def skipping_runner_init(self, *args, **kwargs):
        runner_init(self, *args, **kwargs)
        from vllm.config import get_current_vllm_config

        skip, seen = _skip_for(get_current_vllm_config().model_config)
        if skip is not None:
            attach(self, skip, seen)

    from vllm.config import VllmConfig

    compute_hash = VllmConfig.compute_hash

    @functools.wraps(compute_hash)
    def skipping_compute_hash(self, *args, **kwargs):
        digest = compute_hash(self, *args, **kwargs)
        if getattr(self, "model_config", None) is None or _skip_for(self.model_config)[0] is None:
            return digest
        return hashlib.sha256(f"{digest}|{COMPILE_FACTOR}".encode()).hexdigest()[: len(digest)]

    EngineArgs.create_engine_config = checked_create_engine_config
    VllmConfig.compute_hash = skipping_compute_hash
    if MoERunner is not None:
        MoERunner.__init__ = functools.wraps(runner_init)(skipping_runner_init)
    _INSTALLED = True


__all__ = ["install", "SkipRecordError"]
