"""Decoder layers one at a time, from a loaded model or from a checkpoint directory.

Pruning streams the calibration hidden states through the model layer by layer.
With a path only the embedding and one decoder layer are ever materialized: the
model skeleton lives on the meta device and each layer's tensors are read from the safetensors
shards when it is needed and dropped afterwards, so peak memory does not grow with depth.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Iterator

import torch
from torch import nn

from moe_fast.adapters import MoEAdapter, get_adapter
from moe_fast.checkpoint.loading import match_dequantized_experts, resolve_dtype
from moe_fast.checkpoint.preflight import check_model_dir
from moe_fast.models import resolve_model

log = logging.getLogger(__name__)


class LayerSource:
    """What the streaming pruner needs from a model; see the two implementations below."""

    config = None
    adapter: MoEAdapter
    device: torch.device
    dtype: torch.dtype
    rotary: nn.Module
    path: str | None = None

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, index: int) -> contextlib.AbstractContextManager[nn.Module]:
        raise NotImplementedError

    def layer_kwargs(self, hidden: torch.Tensor) -> dict:
        return self.adapter.layer_call_kwargs(self.config, self.rotary, hidden)

    def moe_layers(self) -> list[int]:
        """Indices of the decoder layers with an MoE block, as the adapter finds them in the model
        (a checkpoint's skeleton on the meta device: no weights read)."""
        layers = self.adapter.decoder_layers(self._layers_model())
        return [i for i, layer in enumerate(layers) if self.adapter.moe_block(layer) is not None]

    def _layers_model(self) -> nn.Module:
        raise NotImplementedError


class LoadedSource(LayerSource):
    """A transformers model already in memory; a layer moves to ``device`` only while it is used.

    A model transformers (< 5.24) dequantized from MXFP4 keeps its expert projections in bf16
    beside float32 layers: they are cast once here, exactly (``match_dequantized_experts``), so that
    every forward of the run sees one dtype."""

    def __init__(self, model: nn.Module, device: str | torch.device | None = None) -> None:
        self.model = match_dequantized_experts(model)
        self.config = model.config
        self.adapter = get_adapter(model)
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.rotary = self.adapter.base_model(model).rotary_emb

    def _layers_model(self) -> nn.Module:
        return self.model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.model.get_input_embeddings()
        dev = emb.weight.device
        return emb(ids.to(dev)).to(self.device)

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        layer = self.adapter.decoder_layers(self.model)[index]
        home = next(layer.parameters()).device
        if home != self.device:
            layer.to(self.device)
        try:
            yield layer
        finally:
            if home != self.device:
                layer.to(home)


class CheckpointSource(LayerSource):
    """A checkpoint directory in the hub layout (safetensors, possibly sharded), read lazily."""

    def __init__(self, path: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = str(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"model directory {self.path!r} does not exist")
        self.config = AutoConfig.from_pretrained(self.path)
        self.adapter = get_adapter(self.config)
        self.device = torch.device(device or "cpu")
        self.dtype = resolve_dtype(dtype, self.config)
        self.weight_map = checkpoint_weight_map(self.path)
        self._handles: dict[str, object] = {}
        self.layer_keys: dict[int, list[str]] = {}
        for key in self.weight_map:
            if key.startswith("model.layers."):
                self.layer_keys.setdefault(int(key.split(".")[2]), []).append(key)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config)
        self.config = self.skeleton.config
        self.rotary = type(self.adapter.base_model(self.skeleton).rotary_emb)(config=self.config).to(self.device)
        self._embed = self.skeleton.get_input_embeddings()
        name = "model.embed_tokens.weight"
        if name not in self.weight_map:
            raise ValueError(f"{self.path}: checkpoint has no {name}")
        self._embed.load_state_dict({"weight": self.tensor(name)}, assign=True)
        self._embed.to(self.device, self.dtype)
        self.close_files()

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, read through a handle that is closed again at the end of the current layer.

        Keeping shards open would leave their memory-mapped pages resident, so the process's
        memory would grow with every layer read.
        """
        from safetensors import safe_open

        file = self.weight_map[key]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.path, file), framework="pt", device="cpu")
        return self._handles[file].get_tensor(key)

    def close_files(self) -> None:
        for handle in self._handles.values():
            exit_fn = getattr(handle, "__exit__", None)
            if exit_fn is not None:
                exit_fn(None, None, None)
        self._handles.clear()

    def _layers_model(self) -> nn.Module:
        return self.skeleton

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embed(ids.to(self.device))

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        prefix = f"model.layers.{index}."
        try:
            state = self.adapter.layer_state_from_checkpoint(_LazyTensors(self, prefix, self.layer_keys.get(index, [])))
        finally:
            self.close_files()
        module = self.adapter.decoder_layers(self.skeleton)[index]
        module.load_state_dict(state, assign=True, strict=True)
        del state
        module.to(self.device, self.dtype)
        try:
            yield module
        finally:
            module.to("meta")


def open_source(model_or_path: nn.Module | str | os.PathLike, device: str | None, dtype: str) -> LayerSource:
    """A loaded model as is, or a checkpoint directory (a hub name resolved), checked before any work."""
    if isinstance(model_or_path, nn.Module):
        return LoadedSource(model_or_path, device=device)
    path = resolve_model(os.fspath(model_or_path))
    check_model_dir(path)  # a truncated or corrupt file, a bad MXFP4 pair in any layer: one clear error before any work
    return CheckpointSource(path, device=device, dtype=dtype)


class _LazyTensors(Mapping):
    """A layer's checkpoint tensors, keys relative to the layer, read from disk on access."""

    def __init__(self, source: CheckpointSource, prefix: str, keys: list[str]) -> None:
        self.source, self.prefix = source, prefix
        self.keys_ = [k[len(prefix) :] for k in keys]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source.tensor(self.prefix + key)

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def checkpoint_weight_map(path: str) -> dict[str, str]:
    """key -> safetensors file name of a checkpoint directory (sharded or single file)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt", device="cpu") as f:
            return {key: "model.safetensors" for key in f.keys()}
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)")
