"""What every command checks about its model and device before the first forward.

Why one home: a corrupt MXFP4 pair in the last layer, a device this machine does not have, or
a checkpoint whose expert tensors transformers would not load (and so initialise randomly) must
each end in one clear error before any work: after hours of search, or never, is too late.
``prune``, ``skip`` and ``eval`` all call these.
"""

from __future__ import annotations

import json
import os

import torch

from moe_fast.checkpoint import mxfp4
from moe_fast.checkpoint.verify import verify_checkpoint


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device that exists here (None stays None); a ValueError naming it otherwise."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {str(device)!r} is not a device torch knows (use cpu or cuda)") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"device {str(device)!r}: {dev.type} is not available on this machine (torch {torch.__version__})")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ValueError(f"device {str(device)!r}: this machine has {count()} {dev.type} device(s)")
    return dev


def check_model_dir(path: str) -> dict[str, str]:
    """Checks a checkpoint directory from its files' headers (no tensor read): every weight file
    whole (``verify_checkpoint``) and every MXFP4 blocks / scales pair (``mxfp4.check_checkpoint``,
    naming file and layer); MXFP4 tensors under a config.json without its ``quantization_config``
    are refused (transformers would leave those experts randomly initialised). Returns the key -> file map."""
    weight_map = verify_checkpoint(path)
    config = _read_config(path)
    if config is None or not weight_map:
        return weight_map
    num_experts = _num_experts(config)
    packed = sorted(k for k in weight_map if mxfp4.packed_key(k) is not None)
    if packed and not mxfp4.is_mxfp4(_Config(config)):
        raise ValueError(
            f"{path}: {len(packed)} expert tensors are MXFP4-packed ({packed[0]}, ...) but config.json has no "
            "quantization_config with quant_method mxfp4, so they would not load (transformers would initialise "
            "those experts randomly); restore the checkpoint's quantization_config"
        )
    mxfp4.check_checkpoint(path, weight_map, num_experts)
    return weight_map


def _read_config(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None  # transformers' own loading says what is wrong with it
    return config if isinstance(config, dict) else None


def _num_experts(config: dict) -> int | None:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


class _Config:
    """A config.json dict seen as a config object (``mxfp4.is_mxfp4`` reads attributes)."""

    def __init__(self, data: dict) -> None:
        self.quantization_config = data.get("quantization_config")


def model_limits(config) -> tuple[int | None, int | None]:
    """(vocab_size, max_position_embeddings) of a transformers config, None where it has none:
    what calibration ids are checked against (``calibration.check_ids_fit``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab, positions = getattr(text, "vocab_size", None), getattr(text, "max_position_embeddings", None)
    return (vocab if isinstance(vocab, int) else None), (positions if isinstance(positions, int) else None)
