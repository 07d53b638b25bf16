"""A tiny gpt-oss checkpoint in OpenAI's MXFP4 layout, written by hand (no transformers quantizer).

OpenAI's release stores each layer's expert projections as ``mlp.experts.<proj>_blocks`` (uint8
[E, rows, K/32, 16]: two FP4 e2m1 codes a byte, the low nibble first) and ``<proj>_scales``
(uint8 [E, rows, K/32]: one E8M0 exponent, biased by 127, per block of 32 values), where
``rows x K`` is the projection's weight as ``x @ W.T`` takes it: gate_up [E, 2I, H] and down
[E, H, I] (transformers' own layout is the transpose, gate_up_proj [E, H, 2I]). Everything else
is bf16 as in the release, and config.json carries its ``quantization_config``.
"""

from __future__ import annotations

import json
import os

import torch

from helpers.tiny_models import tiny_model

# The FP4 e2m1 magnitudes of codes 0..7; code | 8 is the negative value.
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# What config.json of openai/gpt-oss-20b and -120b carries.
OPENAI_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}
HIDDEN, INTERMEDIATE = 64, 32  # multiples of 32: two blocks per gate_up row, one per down row


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., K] (K a multiple of 32) -> (blocks [..., K/32, 16], scales [..., K/32]) uint8.

    Each block of 32 gets the power of two that maps its largest magnitude into [4, 8), then every
    value its nearest FP4 code (magnitudes above 6 clip to 6). Only valid, not optimal, MXFP4.
    """
    *prefix, K = weight.shape
    groups = weight.float().reshape(*prefix, K // 32, 32)
    amax = groups.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-30))) - 2, torch.full_like(amax, -127))
    exp = exp.clamp(-127, 127)
    scaled = groups / torch.pow(2.0, exp).unsqueeze(-1)
    mags = torch.tensor(FP4_MAGNITUDES)
    code = (scaled.abs().unsqueeze(-1) - mags).abs().argmin(-1) + 8 * (scaled < 0).long()
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def tiny_gpt_oss(seed: int = 0):
    """The tiny random gpt-oss of tests/helpers/tiny_models.py with sizes MXFP4 can pack, in bf16."""
    return tiny_model("gpt_oss", seed=seed, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE).to(torch.bfloat16)


def mxfp4_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict with every layer's gate_up_proj / down_proj replaced by MXFP4 blocks and scales."""
    state = {}
    for key, tensor in model.state_dict().items():
        for proj in ("gate_up_proj", "down_proj"):
            if key.endswith(f".experts.{proj}"):
                blocks, scales = quantize_mxfp4(tensor.transpose(1, 2))  # [E, H, 2I] -> rows [E, 2I, H]
                state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
                break
        else:
            state[key] = tensor.detach().clone().contiguous()
    return state


def write_mxfp4_checkpoint(path, seed: int = 0, state: dict | None = None, shards: int = 2) -> str:
    """A directory with the MXFP4 checkpoint of ``tiny_gpt_oss(seed)`` (or of ``state``), sharded
    in ``shards`` files by layer, and config.json as OpenAI's (dtype bfloat16, quantization_config)."""
    from safetensors.torch import save_file

    model = tiny_gpt_oss(seed)
    state = mxfp4_state_dict(model) if state is None else state
    os.makedirs(path, exist_ok=True)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else -1
        files.setdefault(f"model-{min(layer + 1, shards - 1):05d}.safetensors", {})[key] = tensor
    weight_map = {}
    for name, tensors in files.items():
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = model.config.to_dict()
    config["dtype"] = "bfloat16"
    config["quantization_config"] = dict(OPENAI_QUANTIZATION_CONFIG)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return str(path)


def load_dequantized(path, dtype: torch.dtype = torch.float32):
    """The checkpoint as transformers loads it on CPU: ``Mxfp4Config(dequantize=True)``. Before 5.24
    transformers keeps the dequantized expert projections in bf16 whatever dtype is asked: they are
    cast here to ``dtype`` (exact), so that every version gives the same model."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=Mxfp4Config(dequantize=True))
    for layer in model.model.layers:
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(layer.mlp.experts, name)
            weight.data = weight.data.to(dtype)
    return model.eval()
