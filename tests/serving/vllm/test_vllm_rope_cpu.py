"""Why DeepSeek-V3 is served with ``custom_ops: ["-rotary_embedding"]`` on vLLM's CPU build (families.VLLM_ENGINE).

vLLM 0.32's CPU rotary-embedding op (``RotaryEmbedding.forward_cpu``, ``torch.ops._C.rotary_embedding``)
rotates a 3-D query ``[tokens, heads, rope_dim]`` with more than one head wrongly, and a key that is a
strided slice wrongly: exactly what MLA passes it (``q[..., qk_nope:]`` of the ``[tokens, heads, 192]``
query, ``k_pe`` sliced from the latent). The PyTorch rotation (``forward_native``, what the setting
selects) equals transformers' interleaved rotation (``rope_interleave``, DeepSeek-V3's). This pins
both, on MLA's shapes: when a vLLM update fixes the op, the first assertion fails and the setting can go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from engine import CHILD_ENV

_CHILD = r"""
import json, torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope

ctx = set_current_vllm_config(VllmConfig()); ctx.__enter__()
torch.manual_seed(0)
T, H, NOPE, ROPE, LORA = 6, 2, 128, 64, 512
rope = get_rope(ROPE, max_position=128, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, is_neox_style=False)
pos = torch.arange(T)
q, latent = torch.randn(T, H, NOPE + ROPE), torch.randn(T, LORA + ROPE)

def rotate(fn):  # MLA's call (vllm/model_executor/layers/mla.py): views into q and the latent
    qq, kk = q.clone(), latent.clone()
    q_pe, k_pe = fn(pos, qq[..., NOPE:], kk[:, LORA:].unsqueeze(1))
    return q_pe.clone(), k_pe.clone()

native, op = rotate(rope.forward_native), rotate(rope.forward_cpu)
inv = 1.0 / (10000.0 ** (torch.arange(0, ROPE, 2).float() / ROPE))
angle = pos[:, None].float() * inv
cos, sin = angle.cos()[:, None], angle.sin()[:, None]

def transformers_interleave(x):  # transformers' apply_rotary_pos_emb_interleave (de-interleaved layout)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

perm = torch.cat([torch.arange(0, ROPE, 2), torch.arange(1, ROPE, 2)])
hf_q, hf_k = transformers_interleave(q[..., NOPE:]), transformers_interleave(latent[:, LORA:].unsqueeze(1))
print("RESULT", json.dumps({
    "op_q": float((op[0] - native[0]).abs().max()), "op_k": float((op[1] - native[1]).abs().max()),
    "native_vs_transformers": max(float((native[0][..., perm] - hf_q).abs().max()), float((native[1][..., perm] - hf_k).abs().max())),
}))
"""


def test_vllm_cpu_rotary_op_misrotates_mla_queries_and_the_pytorch_rotation_is_right() -> None:
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=os.environ | CHILD_ENV,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    print(got)
    # Measured with vllm-cpu 0.32.0: op_q 7.7, op_k 4.6 on unit-variance inputs.
    assert got["op_q"] > 0.5 and got["op_k"] > 0.5, f"vLLM's CPU rotary op now rotates MLA's query and key right ({got}): families.VLLM_ENGINE's custom_ops setting can go"
    assert got["native_vs_transformers"] < 1e-5, got
