"""Checking a safetensors checkpoint's files before reading them and after writing them.

Why: a truncated or corrupt weight file otherwise surfaces deep inside safetensors or
transformers as a long traceback, and a checkpoint whose shards are missing or cut short must
never be reported as written. The check reads only the files' headers (a few KiB each) and their
sizes, so it costs nothing next to loading the weights.
"""

from __future__ import annotations

import json
import math
import os
import struct

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_HEADER_LIMIT = 100 * 2**20  # safetensors refuses headers above 100 MB
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt; the message names the file."""


def read_header(path: str) -> dict[str, dict]:
    """Tensor entries ``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file.

    Raises CheckpointError naming ``path`` when the file is missing, truncated (shorter than its
    header says), longer than its header says, or its header is not a valid safetensors header.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes; not even the 8-byte header length)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _HEADER_LIMIT or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated or not a safetensors file (header length {header_len}, file of {size} bytes)"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file missing") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        _check_entry(path, name, entry)
        end = max(end, entry["data_offsets"][1])
    want = 8 + header_len + end
    if size < want:
        raise CheckpointError(f"{path}: truncated ({size} bytes, its header needs {want})")
    if size > want:
        raise CheckpointError(f"{path}: corrupt ({size} bytes, its header describes {want})")
    return header


def _check_entry(path: str, name: str, entry) -> None:
    try:
        dtype, shape, (lo, hi) = entry["dtype"], entry["shape"], entry["data_offsets"]
        count = math.prod(int(d) for d in shape)
        ok = dtype in _DTYPE_BYTES and 0 <= lo <= hi and hi - lo == count * _DTYPE_BYTES[dtype]
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: corrupt safetensors header (entry {name!r})")


def verify_checkpoint(directory: str, strict: bool = False) -> dict[str, str]:
    """Checks a checkpoint directory's weight files; returns its key -> file map.

    Sharded (``model.safetensors.index.json``): every shard the index names exists, its header
    holds the tensors the index assigns to it and its size matches the header. ``strict`` (for
    checkpoints moe_fast wrote itself) also requires no other tensors in a shard; other writers
    are not held to that. (The index's ``total_size`` is not compared: writers count shared
    storage differently.) Single file: its header and size. Directories with neither file are
    left to the loader (which names what is missing).
    """
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = dict(index["weight_map"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path}: corrupt index ({err})") from None
        by_file: dict[str, set[str]] = {}
        for key, file in weight_map.items():
            by_file.setdefault(file, set()).add(key)
        for file, keys in sorted(by_file.items()):
            path = os.path.join(directory, file)
            header = read_header(path)
            if not keys <= set(header) or (strict and set(header) != keys):
                missing, extra = sorted(keys - set(header)), sorted(set(header) - keys)
                raise CheckpointError(
                    f"{path}: tensors differ from {INDEX_NAME} (missing {missing[:3]}, unexpected {extra[:3]})"
                )
        return weight_map
    single = os.path.join(directory, SINGLE_NAME)
    if os.path.exists(single):
        return {key: SINGLE_NAME for key in read_header(single)}
    return {}


__all__ = ["CheckpointError", "read_header", "verify_checkpoint"]
