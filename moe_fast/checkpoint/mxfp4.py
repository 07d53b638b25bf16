"""OpenAI's MXFP4 expert weights (every gpt-oss checkpoint on the hub), read without transformers' quantizer.

The release stores each layer's expert projections as two uint8 tensors:
``mlp.experts.<proj>_blocks`` [E, rows, G, 16] holds FP4 e2m1 codes, two a byte (the low nibble is
the even column), and ``<proj>_scales`` [E, rows, G] one E8M0 exponent (biased by 127) per block of
32 values; a row of ``G * 32`` values is the projection as ``x @ W.T`` takes it. Dequantized, the
projection is transposed into transformers' layout: gate_up_proj [E, H, 2I], down_proj [E, I, H].

Why here and not transformers' own helper: pruning reads one layer at a time from the files
(moe_fast.pruning.source) and must not depend on a private function; the arithmetic is the same
(a lookup table in the target dtype, then ``torch.ldexp``), so the result is bit for bit
transformers' ``Mxfp4Config(dequantize=True)``. The values are exact in bf16 (one mantissa bit,
E8M0's range is bf16's), so dequantizing to bf16 and casting loses nothing.
"""

from __future__ import annotations

import os

import torch

from moe_fast.checkpoint.verify import read_header

# Value of each 4-bit code: e2m1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
PACKED_SUFFIXES = ("_blocks", "_scales")
QUANT_METHOD = "mxfp4"


def quant_method(config) -> str | None:
    """The ``quant_method`` of a config's ``quantization_config`` (a dict or a transformers config object), else None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) if method is not None else None


def is_mxfp4(config) -> bool:
    """Whether a checkpoint's config says its weights are MXFP4 (OpenAI's gpt-oss release)."""
    return quant_method(config) == QUANT_METHOD


def packed_key(key: str) -> tuple[str, str] | None:
    """(projection key, "_blocks" or "_scales") of a packed tensor's key, else None.

    ``mlp.experts.gate_up_proj_blocks`` -> ("mlp.experts.gate_up_proj", "_blocks").
    """
    for suffix in PACKED_SUFFIXES:
        if key.endswith(suffix) and ".experts." in key:
            return key[: -len(suffix)], suffix
    return None


def check_pair(name: str, blocks_shape, scales_shape, num_experts: int | None = None, where: str = "") -> None:
    """Refuses a blocks / scales pair that is not MXFP4: blocks [E, rows, G, 16], scales [E, rows, G].

    ``where`` (a checkpoint path) goes into the message.
    """
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    where = f" {where}" if where else ""
    if len(blocks_shape) != 4 or blocks_shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 checkpoint{where}: {name}_blocks has shape {list(blocks_shape)}, expected [experts, rows, groups, {BLOCK // 2}]"
        )
    if blocks_shape[:-1] != scales_shape:
        raise ValueError(
            f"MXFP4 checkpoint{where}: {name}_scales has shape {list(scales_shape)}, expected {list(blocks_shape[:-1])} "
            f"(one scale per block of {BLOCK} values of {name}_blocks {list(blocks_shape)})"
        )
    if num_experts is not None and blocks_shape[0] != num_experts:
        raise ValueError(f"MXFP4 checkpoint{where}: {name}_blocks has {blocks_shape[0]} experts in dim 0, the config {num_experts}")


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, name: str = "experts") -> torch.Tensor:
    """blocks [E, rows, G, 16], scales [E, rows, G] (uint8) -> weight [E, G * 32, rows] in ``dtype``.

    As transformers' ``convert_moe_packed_tensors``: every code looked up in a table of ``dtype``,
    scaled by ``2 ** (scale - 127)`` with ``torch.ldexp``, rows laid out then transposed; element by
    element the same operations, only done one expert at a time (gpt-oss-120b's gate_up has 128
    experts of 5760 x 2880: int32 codes for all of them at once would be 4 GiB more).
    """
    for label, t in (("blocks", blocks), ("scales", scales)):
        if t.dtype != torch.uint8:
            raise ValueError(f"MXFP4 checkpoint: {name}_{label} is {t.dtype}, expected uint8")
    check_pair(name, blocks.shape, scales.shape)
    E, rows, G, B = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    weight = torch.empty(E, G * 2 * B, rows, dtype=dtype, device=blocks.device)
    for e in range(E):  # one expert's temporaries at a time: the peak is the result plus one expert
        flat = blocks[e].reshape(-1, B)
        out = torch.empty(flat.shape[0], 2 * B, dtype=dtype, device=blocks.device)
        out[:, 0::2] = lut[(flat & 0x0F).int()]
        out[:, 1::2] = lut[(flat >> 4).int()]
        torch.ldexp(out, scales[e].reshape(-1, 1).int() - 127, out=out)
        weight[e] = out.view(rows, G * 2 * B).t()
        del flat, out
    return weight


def check_checkpoint(path: str, weight_map: dict[str, str], num_experts: int | None = None) -> int:
    """Checks every blocks / scales pair of a checkpoint directory from the files' headers (no
    tensor is read): each has its partner and matching shapes. Returns the number of pairs.

    Why: the export slices blocks and scales one key at a time, so a mismatched pair would
    otherwise be written out as a checkpoint that transformers cannot load.
    """
    pairs: dict[str, dict[str, str]] = {}
    for key in weight_map:
        hit = packed_key(key)
        if hit is not None:
            pairs.setdefault(hit[0], {})[hit[1]] = key
    if not pairs:
        return 0
    headers: dict[str, dict] = {}
    for name, pair in sorted(pairs.items()):
        files = ", ".join(sorted({weight_map[key] for key in pair.values()}))
        where = f"{path} ({files}{_layer_note(name)})"  # file and layer: which shard to fix
        missing = [suffix for suffix in PACKED_SUFFIXES if suffix not in pair]
        if missing:
            raise ValueError(f"MXFP4 checkpoint {where}: {name}{missing[0]} is missing beside {next(iter(pair.values()))}")
        shapes = []
        for suffix in PACKED_SUFFIXES:
            file = weight_map[pair[suffix]]
            if file not in headers:
                headers[file] = read_header(os.path.join(path, file))
            entry = headers[file].get(pair[suffix])
            if entry is None:
                raise ValueError(f"MXFP4 checkpoint {where}: {pair[suffix]} is not in {file}, which its index names")
            if entry["dtype"] != "U8":
                raise ValueError(f"MXFP4 checkpoint {where}: {pair[suffix]} is {entry['dtype']}, expected U8")
            shapes.append(entry["shape"])
        check_pair(name, shapes[0], shapes[1], num_experts, where=where)
    return len(pairs)


def _layer_note(name: str) -> str:
    """", layer 3" for a key under ``model.layers.3.``, else ""."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return f", layer {parts[2]}"
    return ""
