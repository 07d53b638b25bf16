"""Tiny checkpoints of every supported family in shapes that vLLM's CPU build serves.

The main suite's tiny models (tests/helpers/tiny_models.py) have 8-wide attention heads; vLLM's CPU
attention takes head sizes of 32 and up, and its DeepSeek-V3 (MLA) path only the real model's
(qk_nope 128, qk_rope 64, v 128, kv_lora_rank 512), and reads ``scoring_func: "sigmoid"`` and
``topk_method: "noaux_tc"`` from config.json (without them it routes by softmax and does not load
the selection bias): the hub's checkpoints have them, so the source written here has them too (the
exports add them when a source lacks them: MoEAdapter.serving_config_keys). Everything else is the
main suite's tiny model, except for the families vLLM serves in bfloat16 only (VLLM_DTYPE: gpt-oss):
a smaller lm_head (BF16_LM_HEAD_SCALE). DeepSeek-V3 is served in float32 with the engine settings of
VLLM_ENGINE (see there: vLLM 0.32's CPU rotary-embedding op mis-rotates MLA's queries).
"""

from __future__ import annotations

import json
import os

import torch

from helpers.checkpoints import save_checkpoint
from helpers.tiny_models import VOCAB, tiny_model

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss"]
# Experts kept by the prune of each family (E = 16 in 4 groups for DeepSeek-V3, else 8): a grouped
# router keeps the same number in every group.
KEEP = {family: 6 for family in FAMILIES} | {"deepseek_v3": 12}
# head_dim 32 on hidden 64 with 2 query heads and 1 KV head (grouped-query attention stays tested).
ATTENTION = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
MLA = dict(
    hidden_size=64, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, kv_lora_rank=512, q_lora_rank=24, topk_method="noaux_tc",
    qk_head_dim=192, head_dim=64,  # derived in the config's __init__, which the overrides come after
)


# vLLM's dtype per family (float32 elsewhere): its CPU experts for gpt-oss (biases, clamped SwiGLU;
# MXFP4) take only bfloat16 weights. transformers runs these in bfloat16 too (HF_DTYPE): like with
# like, on the unpruned and the pruned model alike.
VLLM_DTYPE = {"gpt_oss": "bfloat16", "gpt_oss_mxfp4": "bfloat16"}
HF_DTYPE = {name: getattr(torch, dtype) for name, dtype in VLLM_DTYPE.items()}
# lm_head of the bfloat16-served checkpoints scaled by this: logits of std ~0.5 instead of ~2, so that
# bfloat16's ~1% relative error on the final hidden state moves log-probs by ~1e-2, not ~5e-2 (the
# routing, which pruning changes, is untouched).
BF16_LM_HEAD_SCALE = 0.25
# vllm.LLM settings per family over the dtype. DeepSeek-V3 in float32: on CPUs with AMX vLLM picks its
# AMX MLA attention, which takes bfloat16 only, so the plain CPU MLA backend is named; and vLLM 0.32's
# CPU rotary-embedding op (torch.ops._C.rotary_embedding, RotaryEmbedding.forward_cpu) rotates MLA's
# query wrong: MLA passes it as a [tokens, heads, 64] slice of the [tokens, heads, 192] query (and the
# shared key as a strided slice of the latent), and the op mis-indexes every head of a 3-D query with
# more than one head and a strided key (errors up to ~5 on unit-variance inputs; the 2-D query of
# other models is right; positions 0 are unrotated, so right). That alone put the tiny model 2.6 nats
# from transformers. With the op disabled (custom_ops "-rotary_embedding": vLLM's PyTorch rotation,
# forward_native, equal to transformers' interleaved rotation), vLLM serves it 1e-6 from transformers
# in float32. tests/serving/vllm/test_vllm_rope_cpu.py pins the op's error.
VLLM_ENGINE = {
    "deepseek_v3": {"attention_backend": "CPU_MLA", "compilation_config": {"custom_ops": ["-rotary_embedding"]}},
}


def vllm_engine(name: str) -> dict:
    """``vllm.LLM`` keyword arguments that serve checkpoint ``name`` (a family, or gpt_oss_mxfp4)."""
    return {"dtype": VLLM_DTYPE.get(name, "float32")} | VLLM_ENGINE.get(name, {})


def family_overrides(family: str) -> dict:
    """Config overrides that make the tiny model of ``family`` servable by vLLM on CPU."""
    if family == "deepseek_v3":
        return dict(MLA)
    if family in ("qwen2_moe", "olmoe"):  # no head_dim key: hidden / heads = 32
        return {k: v for k, v in ATTENTION.items() if k != "head_dim"}
    return dict(ATTENTION)


def vllm_tiny_model(family: str, seed: int = 0):
    """The tiny float32 model of ``family`` with vLLM-servable attention shapes."""
    model = tiny_model(family, seed=seed, **family_overrides(family))
    if family == "deepseek_v3":  # weights drawn for 32-wide inputs: rescale the 512- and 128-wide ones
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                attn.kv_b_proj.weight.mul_((32 / attn.kv_b_proj.weight.shape[1]) ** 0.5)
                attn.o_proj.weight.mul_((32 / attn.o_proj.weight.shape[1]) ** 0.5)
    if family in VLLM_DTYPE:
        with torch.no_grad():
            model.lm_head.weight.mul_(BF16_LM_HEAD_SCALE)
    return model


def write_family_checkpoint(family: str, path, seed: int = 0) -> str:
    """A sharded float32 hub-layout checkpoint of ``vllm_tiny_model(family)``; returns its folder."""
    model = vllm_tiny_model(family, seed)
    folder = save_checkpoint(model, path, shard="200KB")
    if family == "deepseek_v3":  # keys transformers does not write but the hub's checkpoints have (vLLM reads them)
        cfg_path = os.path.join(folder, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg |= {"topk_method": "noaux_tc", "scoring_func": "sigmoid"}
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)
    return folder


def prompts(n: int = 4, length: int = 20, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    """``n`` random token-id prompts of different lengths (``length`` down to ``length - n + 1``), no special ids."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length - i,), generator=gen).tolist() for i in range(n)]


def write_mxfp4_family_checkpoint(path, seed: int = 0) -> str:
    """gpt-oss in OpenAI's MXFP4 layout (bf16 elsewhere, ``quantization_config`` in config.json), with
    vLLM-servable attention; expert sizes that MXFP4 packs (tests/helpers/mxfp4_checkpoint.py)."""
    from safetensors.torch import save_file

    from helpers.mxfp4_checkpoint import HIDDEN, INTERMEDIATE, OPENAI_QUANTIZATION_CONFIG, mxfp4_state_dict

    overrides = family_overrides("gpt_oss") | dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE)
    model = tiny_model("gpt_oss", seed=seed, **overrides)
    with torch.no_grad():
        model.lm_head.weight.mul_(BF16_LM_HEAD_SCALE)
    model = model.to(torch.bfloat16)
    os.makedirs(path, exist_ok=True)
    save_file(mxfp4_state_dict(model), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = ["GptOssForCausalLM"]  # save_pretrained would add it; vLLM picks the model class by it
    config["dtype"] = "bfloat16"
    config["quantization_config"] = dict(OPENAI_QUANTIZATION_CONFIG)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return str(path)
