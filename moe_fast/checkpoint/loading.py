"""The pieces of a checkpoint every command loads the same way: its dtype and its tokenizer.

Why one home: ``--dtype auto`` must mean the checkpoint's own dtype, and a checkpoint without
tokenizer files must still work with token-id calibration, in every command alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from moe_fast.checkpoint import mxfp4

log = logging.getLogger(__name__)

# from_pretrained arguments that also say where the config is.
CONFIG_KWARGS = ("revision", "trust_remote_code", "cache_dir", "token", "local_files_only", "subfolder")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """A dtype name ("float32", "bfloat16", "float16"), a dtype, or None / "auto" for ``default``."""
    if name is None or name == "auto":
        return default
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a transformers config records (``dtype``, formerly ``torch_dtype``); float32 when none."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored, torch.float32)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def resolve_dtype(name: str | torch.dtype | None, config) -> torch.dtype:
    """The dtype to compute in: ``name``, or for "auto" the checkpoint's own (:func:`checkpoint_dtype`)."""
    return parse_dtype(name, checkpoint_dtype(config))


def from_pretrained_dtype(name: str | torch.dtype | None) -> str | torch.dtype:
    """``dtype=`` for transformers' ``from_pretrained``: "auto" is left to transformers, which reads
    the checkpoint's dtype the same way (and can also see the weights when the config has none)."""
    return "auto" if name is None or name == "auto" else parse_dtype(name, torch.float32)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with a checkpoint, or None when there is none (token ids still work)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # no tokenizer files: a .pt calibration needs no tokenizer
        log.debug("no tokenizer at %s: %s", path, err)
        return None


def model_load_kwargs(path: str | os.PathLike, **kwargs) -> dict:
    """``kwargs`` for transformers' ``from_pretrained(path)``, plus what the checkpoint needs to load
    as numbers: an MXFP4 checkpoint (OpenAI's gpt-oss release) gets ``Mxfp4Config(dequantize=True)``.

    Why: without it transformers builds Triton-kernel experts (or, lacking accelerate or kernels,
    refuses), and pruning, skipping and evaluation need the experts' weights; dequantized, they are
    exactly the checkpoint's values in bf16 (see moe_fast/checkpoint/mxfp4.py). A ``quantization_config`` the
    caller passes is kept.
    """
    if "quantization_config" in kwargs:
        return kwargs
    from transformers import AutoConfig

    config_kwargs = {k: kwargs[k] for k in CONFIG_KWARGS if k in kwargs}
    if mxfp4.is_mxfp4(AutoConfig.from_pretrained(path, **config_kwargs)):
        from transformers import Mxfp4Config

        return {**kwargs, "quantization_config": Mxfp4Config(dequantize=True)}
    return kwargs


def load_pretrained(path: str | os.PathLike, model_class=None, **kwargs):
    """``model_class.from_pretrained(path, **model_load_kwargs(path, **kwargs))`` (default class:
    AutoModelForCausalLM); dequantized MXFP4 experts then take the dtype of their biases
    (``match_dequantized_experts``)."""
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    if kwargs.get("output_loading_info"):
        return model_class.from_pretrained(path, **model_load_kwargs(path, **kwargs))
    with _held_load_reports() as reports:
        model, info = model_class.from_pretrained(path, **model_load_kwargs(path, **kwargs), output_loading_info=True)
    refuse_missing_weights(path, info)  # the refusal names the missing tensors: transformers' report would repeat them
    reports.release()
    return match_dequantized_experts(model)


class _HeldReports(logging.Filter):
    """Holds transformers' load report back until moe_fast has decided whether to refuse the load."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        for record in self.records:
            _LOAD_REPORT_LOGGER.handle(record)
        self.records.clear()


_LOAD_REPORT_LOGGER = logging.getLogger("transformers.modeling_utils")


@contextlib.contextmanager
def _held_load_reports() -> Iterator[_HeldReports]:
    held = _HeldReports()
    _LOAD_REPORT_LOGGER.addFilter(held)
    try:
        yield held
    except BaseException:
        _LOAD_REPORT_LOGGER.removeFilter(held)
        held.release()  # transformers' own error points at its report: show it
        raise
    finally:
        _LOAD_REPORT_LOGGER.removeFilter(held)


def refuse_missing_weights(path: str | os.PathLike, info: dict) -> None:
    """Refuses a load that left parameters without checkpoint values (transformers initialises them
    randomly and warns): scores or a pruned model from random experts must never look like results."""
    missing = sorted(info.get("missing_keys") or ())
    if not missing:
        return
    shown = ", ".join(missing[:4]) + (f", ... ({len(missing)} in all)" if len(missing) > 4 else "")
    unexpected = sorted(info.get("unexpected_keys") or ())
    hint = f"; the checkpoint has instead e.g. {unexpected[0]}" if unexpected else ""
    raise ValueError(f"{os.fspath(path)}: the checkpoint has no weights for {shown} (transformers would "
                     f"initialise them randomly){hint}")  # a no-op unless dtypes differ (loaded configs may drop the quantization entry)


def match_dequantized_experts(model):
    """Casts expert projections (``gate_up_proj``, ``down_proj``) whose dtype differs from their
    bias's to the bias's dtype, which is the one the load asked for.

    Why: transformers before 5.24 keeps MXFP4 experts dequantized in bf16 even when float32 is
    asked for, beside float32 biases and layers. The bf16 values are exact in float32, so the cast
    loses nothing and every version computes alike. Nothing else changes dtype.
    """
    for module in model.modules():
        for name in ("gate_up_proj", "down_proj"):
            weight, bias = getattr(module, name, None), getattr(module, f"{name}_bias", None)
            if isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor) and weight.dtype != bias.dtype:
                weight.data = weight.data.to(bias.dtype)
    return model
