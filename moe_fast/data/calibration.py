"""Calibration tokens for pruning and skipping: ``load_calibration(spec, tokenizer, n, L, seed)``.

A spec is one of
* a ``.txt`` file (the whole file is one text),
* a ``.json`` / ``.jsonl`` file of records with a ``text`` field (the layout of the C4 shards the
  paper used; a ``.json`` file may also hold a list of records or of strings),
* a ``.pt`` file holding a LongTensor ``[n_samples, seq_len]`` of token ids, used as is,
* ``builtin:NAME``: a corpus shipped with moe_fast (``moe_fast.data.builtin.load_builtin``),
* a Hugging Face dataset name (``name`` or ``name:config``), when ``datasets`` is installed and the
  network allows.

Text is tokenized with the model's tokenizer, each record separately; the records are
concatenated and cut into consecutive blocks of ``seq_len`` tokens, and ``n_samples`` of those
blocks are drawn without replacement with ``seed`` (random.Random), so the same spec, tokenizer
and seed always give the same tokens.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import random
from typing import Iterable

import torch

log = logging.getLogger(__name__)

__all__ = ["load_calibration", "read_texts", "sample_blocks", "calibration_fingerprint"]


def read_texts(spec: str) -> list[str]:
    """Texts of a text spec (.txt, .json, .jsonl, builtin:, HF dataset); a clear error otherwise."""
    if spec.startswith("builtin:"):
        return _builtin_texts(spec[len("builtin:") :])
    lower = spec.lower()
    if os.path.exists(spec):
        if lower.endswith(".txt"):
            with open(spec, encoding="utf-8") as f:
                return [f.read()]
        if lower.endswith(".jsonl"):
            with open(spec, encoding="utf-8") as f:
                return [_record_text(json.loads(line), spec, i) for i, line in enumerate(f) if line.strip()]
        if lower.endswith(".json"):
            with open(spec, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict):
                data = data.get("data", data.get("records", [data]))
            return [_record_text(rec, spec, i) for i, rec in enumerate(data)]
        raise ValueError(f"calibration file {spec!r}: expected a .txt, .json, .jsonl or .pt file")
    if lower.endswith((".txt", ".json", ".jsonl", ".pt")) or os.sep in spec and not _looks_like_hub_name(spec):
        raise FileNotFoundError(f"calibration file {spec!r} does not exist")
    return _hf_dataset_texts(spec)


def _looks_like_hub_name(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/"))


def _record_text(rec, spec: str, index: int) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        return rec["text"]
    raise ValueError(f"calibration file {spec!r}: record {index} has no string 'text' field")


def _builtin_texts(name: str) -> list[str]:
    try:
        module = importlib.import_module("moe_fast.data.builtin")
    except ImportError:
        raise ValueError(f"built-in calibration corpus {name!r} requested, but moe_fast.data.builtin is not available") from None
    texts = module.load_builtin(name)
    if isinstance(texts, str):
        return [texts]
    return list(texts)


def _hf_dataset_texts(spec: str) -> list[str]:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ValueError(
            f"calibration spec {spec!r} is neither an existing file nor builtin:NAME, and the "
            "'datasets' package is not installed to fetch it from the Hugging Face hub "
            "(pip install 'moe_fast[hub]')"
        ) from None
    import datasets

    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as err:  # network or hub errors: one clear message
        raise ValueError(f"could not load Hugging Face dataset {spec!r}: {err}") from err
    texts = []
    for i, rec in enumerate(ds):
        texts.append(_record_text(rec, spec, i))
        if i >= 20000:
            break
    return texts


def tokenize_texts(texts: Iterable[str], tokenizer) -> list[int]:
    """Token ids of all texts, each tokenized on its own, concatenated (no special tokens)."""
    ids: list[int] = []
    for text in texts:
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def sample_blocks(tokens: list[int] | torch.Tensor, n_samples: int, seq_len: int, seed: int, source: str = "") -> torch.Tensor:
    """Cut ``tokens`` into consecutive blocks of ``seq_len`` and draw ``n_samples`` of them."""
    flat = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    n_blocks = flat.numel() // seq_len
    if n_blocks < n_samples:
        raise ValueError(
            f"calibration text {source!r} has {flat.numel()} tokens, too few for {n_samples} samples x "
            f"{seq_len} tokens = {n_samples * seq_len} tokens ({n_blocks} full blocks)"
        )
    picks = sorted(random.Random(seed).sample(range(n_blocks), n_samples))
    blocks = flat[: n_blocks * seq_len].view(n_blocks, seq_len)
    return blocks[torch.tensor(picks, dtype=torch.long)].clone()


DEFAULT_SEQ_LEN = 2048


def default_seq_len(max_positions: int | None) -> int:
    """Tokens per text sample when none is asked: 2048, or the model's ``max_position_embeddings``
    when that is smaller (logged: sequences past it would run positions the model never saw)."""
    if max_positions is not None and 0 < int(max_positions) < DEFAULT_SEQ_LEN:
        log.warning("calibration: seq_len %d (the model's max_position_embeddings) instead of the default %d",
                    int(max_positions), DEFAULT_SEQ_LEN)
        return int(max_positions)
    return DEFAULT_SEQ_LEN


def load_calibration(
    spec: str | torch.Tensor,
    tokenizer=None,
    n_samples: int | None = 128,
    seq_len: int | None = DEFAULT_SEQ_LEN,
    seed: int = 42,
    vocab_size: int | None = None,
    max_positions: int | None = None,
) -> torch.LongTensor:
    """Calibration token ids ``[n_samples, seq_len]`` from a spec (see the module docstring).

    A tensor (or ``.pt`` file) of ids is used as is; when ``n_samples`` / ``seq_len`` are given it
    must be at least that large and its first rows / columns are taken. ``None`` for either means
    "all of the tensor" for ids, and 128 / :func:`default_seq_len` for text. With the model's
    ``vocab_size`` and ``max_positions`` (``max_position_embeddings``) the ids are checked against
    them (:func:`check_ids_fit`), so that a bad id is refused before any forward.
    """
    if isinstance(spec, torch.Tensor) or (isinstance(spec, str) and spec.lower().endswith(".pt")):
        ids = spec if isinstance(spec, torch.Tensor) else _load_pt(spec)
        source = str(spec) if isinstance(spec, str) else "tensor"
        ids = _take_ids(ids, n_samples, seq_len, source)
        check_ids_fit(ids, vocab_size, max_positions, source)
        return ids
    if tokenizer is None:
        raise ValueError(
            f"calibration spec {spec!r} is text, but the model has no tokenizer; give a .pt file of token ids"
        )
    n_samples = 128 if n_samples is None else n_samples
    seq_len = default_seq_len(max_positions) if seq_len is None else seq_len
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    check_ids_fit(torch.zeros(0, seq_len, dtype=torch.long), None, max_positions, spec)  # before tokenizing
    texts = read_texts(spec)
    tokens = tokenize_texts(texts, tokenizer)
    log.info("calibration %s: %d records, %d tokens", spec, len(texts), len(tokens))
    ids = sample_blocks(tokens, n_samples, seq_len, seed, source=spec)
    check_ids_fit(ids, vocab_size, None, spec)
    return ids


def check_ids_fit(ids: torch.Tensor, vocab_size: int | None, max_positions: int | None, source: str) -> None:
    """Refuses ids the model cannot embed (negative, or >= ``vocab_size``: the embedding would fail
    with an IndexError mid-run) and sequences longer than ``max_positions``."""
    if max_positions is not None and ids.shape[-1] > int(max_positions):
        raise ValueError(
            f"calibration {source!r}: sequences of {ids.shape[-1]} tokens are longer than the model's "
            f"max_position_embeddings ({int(max_positions)}); give --seq-len {int(max_positions)} or less"
        )
    if vocab_size is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= int(vocab_size):
        bad = low if low < 0 else high
        sample, position = (ids == bad).nonzero()[0].tolist()
        raise ValueError(
            f"calibration ids {source!r}: token id {bad} (sample {sample}, position {position}) is outside the "
            f"model's vocabulary 0..{int(vocab_size) - 1}"
        )


def _load_pt(path: str) -> torch.Tensor:
    if not os.path.exists(path):
        raise FileNotFoundError(f"calibration file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # empty, text, truncated or unsafe pickle: one line naming the file
        cause = " ".join(str(err).split())[:200] or "empty or truncated file"
        raise ValueError(f"calibration file {path!r} is not token ids saved with torch.save ({type(err).__name__}: {cause})") from None
    if isinstance(obj, dict) and "input_ids" in obj:
        obj = obj["input_ids"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"calibration file {path!r} must hold a LongTensor [n_samples, seq_len], got {type(obj).__name__}")
    return obj


def _take_ids(ids: torch.Tensor, n_samples: int | None, seq_len: int | None, source: str) -> torch.Tensor:
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"calibration ids {source!r} must be an integer tensor [n_samples, seq_len], got {ids.dtype} {tuple(ids.shape)}")
    n, length = ids.shape
    if n == 0 or length == 0:
        raise ValueError(f"calibration ids {source!r} hold no tokens (shape {tuple(ids.shape)})")
    want_n = n if n_samples is None else n_samples
    want_l = length if seq_len is None else seq_len
    if want_n > n or want_l > length:
        raise ValueError(
            f"calibration ids {source!r} hold {n} samples x {length} tokens, fewer than the "
            f"{want_n} samples x {want_l} tokens requested"
        )
    return ids[:want_n, :want_l].to(torch.long).contiguous()


def calibration_fingerprint(ids: torch.Tensor) -> str:
    """Short hash of the calibration ids: resuming checks that the tokens did not change."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
