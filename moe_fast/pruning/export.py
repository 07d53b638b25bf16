"""Writing a pruned checkpoint that plain ``transformers`` (and vLLM) load.

Two routes to the same hub layout (for Mixtral ``block_sparse_moe.experts.N.w1/w2/w3``):
* a loaded model is pruned in place and written with ``save_pretrained``;
* a checkpoint directory is rewritten shard by shard (one source shard in memory at a time),
  dropping the removed experts' tensors, renumbering the rest in order and keeping the router
  rows of the kept experts.
``config.json`` gets the new expert count, a ``"moe_fast": {"pruning": ...}`` record and the
routing keys vLLM needs that a transformers-saved config lacks (``MoEAdapter.serving_config_keys``). Quantized
experts stay quantized: gpt-oss' MXFP4 blocks and scales keep the kept experts' entries of dim 0 and
config.json its ``quantization_config`` (moe_fast/checkpoint/mxfp4.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
from torch import nn

from moe_fast.checkpoint import mxfp4
from moe_fast.adapters import MoEAdapter, get_adapter
from moe_fast.checkpoint.config_record import PRUNING_KEY, set_record_entry
from moe_fast.checkpoint.staging import staged_directory

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# Not the tokenizer's, but part of a checkpoint that pruning does not change: always copied.
COMPANION_FILES = ("generation_config.json",)


def prune_loaded_model(model: nn.Module, adapter: MoEAdapter, kept: dict[int, list[int]], pruning_record: dict | None = None) -> nn.Module:
    """Removes the dropped experts of a loaded model in place; all layers must keep the same count."""
    counts = {len(v) for v in kept.values()}
    if len(counts) > 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(counts)}")
    for experts in kept.values():
        adapter.check_keep(sorted(experts))
    layers = adapter.decoder_layers(model)
    for index, experts in kept.items():
        block = adapter.moe_block(layers[index])
        adapter.prune_block(block, sorted(experts))
    if counts:
        r = counts.pop()
        adapter.set_num_experts(model.config, r)
        adapter.add_serving_keys(model.config)
        if hasattr(model, "num_experts"):
            model.num_experts = r
    if pruning_record is not None:
        set_record_entry(model.config, PRUNING_KEY, pruning_record)
    return model


def save_loaded(model: nn.Module, directory: str, tokenizer=None, source_path: str | None = None) -> None:
    """``save_pretrained`` of an already pruned model into ``directory`` (plus tokenizer files)."""
    model.save_pretrained(directory)
    _copy_tokenizer(directory, tokenizer, source_path)


def export_checkpoint(
    source_path: str,
    directory: str,
    adapter: MoEAdapter,
    kept: dict[int, list[int]],
    pruning_record: dict,
    tokenizer=None,
    repaired: dict[int, dict[int, dict[str, torch.Tensor]]] | None = None,
) -> None:
    """Rewrites the checkpoint at ``source_path`` into ``directory`` with only the kept experts;
    ``repaired`` (layer -> original expert index -> {"down_proj": [H, I], "gate_up_proj": [2I, H]})
    replaces those experts' weights (a pruning repair), in the source tensor's dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from moe_fast.pruning.source import checkpoint_weight_map  # cycle: moe_fast.pruning's __init__ imports pruning.output, which imports this module

    counts = {len(v) for v in kept.values()}
    if len(counts) != 1:
        raise ValueError(f"every MoE layer must keep the same number of experts, got {sorted(counts)}")
    r = counts.pop()
    for experts in kept.values():
        adapter.check_keep(sorted(experts))
    weight_map = checkpoint_weight_map(source_path)
    mxfp4.check_checkpoint(source_path, weight_map, adapter.num_experts)  # MXFP4 pairs: sliced one key at a time
    os.makedirs(directory, exist_ok=True)
    # One output shard per decoder layer (plus one for the rest), read and written one at a
    # time: the export holds one layer in memory, whatever the source shard sizes.
    units: dict[str, list[str]] = {}
    for key in weight_map:
        parts = key.split(".")
        unit = f"layer{int(parts[2]):06d}" if key.startswith("model.layers.") else "other"
        units.setdefault(unit, []).append(key)
    order = sorted(units)
    new_map: dict[str, str] = {}
    total = 0
    for number, unit in enumerate(order, start=1):
        name = f"model-{number:05d}-of-{len(order):05d}.safetensors"
        out_tensors: dict[str, torch.Tensor] = {}
        handles: dict[str, object] = {}
        try:
            for key in sorted(units[unit]):
                convert = _prune_key(adapter, key, kept, repaired)
                if convert is None:
                    continue
                file = weight_map[key]
                if file not in handles:
                    handles[file] = safe_open(os.path.join(source_path, file), framework="pt", device="cpu").__enter__()
                new_key, tensor = convert(handles[file].get_tensor(key))
                out_tensors[new_key] = tensor.contiguous()
        finally:
            for handle in handles.values():
                handle.__exit__(None, None, None)
        for key, tensor in out_tensors.items():
            new_map[key] = name
            total += tensor.numel() * tensor.element_size()
        _save_shard(save_file, out_tensors, os.path.join(directory, name))
        del out_tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}, f, indent=2)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source_path)  # saved back by transformers: its own key names
    adapter.set_num_experts(config, r)
    adapter.add_serving_keys(config)
    set_record_entry(config, PRUNING_KEY, pruning_record)
    config.save_pretrained(directory)
    _copy_tokenizer(directory, tokenizer, source_path)


def _prune_key(adapter: MoEAdapter, key: str, kept: dict[int, list[int]], repaired: dict | None = None):
    """A function tensor -> (new key, tensor) for a source key, or None to drop the key."""
    parts = key.split(".")
    if not key.startswith("model.layers.") or int(parts[2]) not in kept:
        return lambda t: (key, t)
    prefix = ".".join(parts[:3]) + "."
    rel = key[len(prefix) :]
    layer_kept = sorted(kept[int(parts[2])])
    hit = adapter._hub_expert_key(rel)
    if hit is not None and hit[0] not in layer_kept:
        return None

    replaced = repaired.get(int(parts[2])) if repaired else None

    def convert(tensor: torch.Tensor):
        if replaced:
            tensor = _repaired_tensor(adapter, rel, tensor, replaced)
        new_rel, new_tensor = adapter.prune_checkpoint_tensor(rel, tensor, layer_kept)
        return prefix + new_rel, new_tensor

    return convert


def _repaired_tensor(adapter: MoEAdapter, rel: str, tensor: torch.Tensor, replaced: dict[int, dict[str, torch.Tensor]]) -> torch.Tensor:
    """A layer's source tensor with repaired expert weights put in (``replaced``: expert ->
    {"down_proj": [H, I], "gate_up_proj": [2I, H]}): a per-expert hub key
    (``...experts.N.<gate|up|down>.weight``: the down projection, or the gate / up half of
    gate_up_proj) or the fused ``experts.down_proj`` [E, H, I] / ``experts.gate_up_proj`` [E, 2I, H]."""
    gate, up, down = (f"{p}.weight" for p in adapter.hub_expert_proj)
    hit = adapter._hub_expert_key(rel)
    if hit is not None:
        rows = replaced.get(hit[0], {})
        if hit[1] == down and "down_proj" in rows:
            return rows["down_proj"].to(tensor.dtype).reshape(tensor.shape)
        if hit[1] in (gate, up) and "gate_up_proj" in rows:
            half = rows["gate_up_proj"].chunk(2, dim=0)[0 if hit[1] == gate else 1]
            return half.to(tensor.dtype).reshape(tensor.shape)
        return tensor
    for name in ("down_proj", "gate_up_proj"):
        if rel in {f"{block}.experts.{name}" for block in (adapter.hub_block_attr, adapter.block_attr)}:
            tensor = tensor.clone()
            for expert, rows in replaced.items():
                if name in rows:
                    tensor[expert] = rows[name].to(tensor.dtype)
    return tensor


def _save_shard(save_file, tensors: dict[str, torch.Tensor], path: str) -> None:
    """``save_file``, with safetensors' own error for a failed write turned into an OSError naming ``path``."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as err:  # SafetensorError("Error while serializing: I/O error: ... (os error 28)")
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number) if number else str(err), path) from err


def _copy_tokenizer(directory: str, tokenizer, source_path: str | None) -> None:
    """The tokenizer (saved, or its files copied) and the companion files such as generation_config.json."""
    names = COMPANION_FILES
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    else:
        names = TOKENIZER_FILES + COMPANION_FILES
    if source_path is None:
        return
    for name in names:
        src = os.path.join(source_path, name)
        if os.path.exists(src) and not os.path.exists(os.path.join(directory, name)):
            shutil.copy2(src, os.path.join(directory, name))


def export_selection(model_path: str, kept: dict[int, list[int]], out: str, record: dict, tokenizer=None) -> str:
    """Writes the checkpoint at ``model_path`` with only ``kept`` experts into ``out`` (staged and
    moved in whole; ``record`` goes to config.json's pruning entry). For a selection made
    elsewhere (the demo's); ``moe_fast.prune`` exports its own."""
    from transformers import AutoConfig

    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"output directory {out!r} exists and is not empty")
    adapter = get_adapter(AutoConfig.from_pretrained(model_path))
    with staged_directory(out) as tmp:
        export_checkpoint(model_path, tmp, adapter, {int(k): sorted(v) for k, v in kept.items()}, record, tokenizer)
    return out

