"""DeepSeek-V3 / R1: grouped sigmoid routing with a selection bias, ``routed_scaling_factor``,
``first_k_dense_replace`` dense layers and shared experts (``GroupedSigmoidAdapter``).

The hub's checkpoints also carry ``scoring_func: "sigmoid"`` and ``topk_method: "noaux_tc"``, which
transformers ignores (it always routes so) but vLLM reads: without them it would route by softmax
and not load the selection bias. A config saved by transformers lacks them, so exports add them.

Kimi-K2-style checkpoints use the same architecture, but transformers maps no ``kimi_k2``
model_type to it (they load through their own remote code, whose modules this adapter does not
know): load them as ``deepseek_v3`` to use moe_fast. Their 384 experts are within the kernels'
limit of 512 (tests/adapters/test_kimi_k2_shape.py).
"""

from __future__ import annotations

from moe_fast.adapters.grouped_sigmoid import GroupedSigmoidAdapter


class DeepseekV3Adapter(GroupedSigmoidAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def serving_config_keys(self) -> dict:
        return {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}
