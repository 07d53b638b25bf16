"""Saving a patched model so that it remembers its skipping, and loading it back patched.

The weights are saved untouched in the hub layout (patching changes no weight); the betas go to
config.json under ``"moe_fast": {"skipping": {"betas": ..., "layers": ...}}`` (next to pruning's
``"pruning"`` record), which stock transformers ignores, so the directory still loads anywhere.
``moe_fast.from_pretrained`` loads it and patches it again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from moe_fast.serving import patching
from moe_fast.adapters import get_adapter, supported_model_types
from moe_fast.checkpoint.config_record import SKIPPING_KEY, has_record_entry, record_entry, set_record_entry
from moe_fast.checkpoint.loading import load_pretrained
from moe_fast.checkpoint.staging import staged_directory

log = logging.getLogger(__name__)


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    **kwargs,
) -> Path:
    """``save_pretrained`` into a temporary directory next to ``directory``, then moved in whole.

    A patched model's betas are in ``config.json`` under ``"moe_fast"``; a family's routing keys
    that other engines read and the config lacks are added (``MoEAdapter.serving_config_keys``). ``kwargs`` go to
    ``save_pretrained``; ``extra_files`` ({name: text}) are written alongside. Refuses to replace
    an existing non-empty directory unless ``overwrite``.
    """
    out = Path(directory)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"moe_fast.save: {out} exists and is not empty (pass overwrite=True)")
    if patching.is_patched(model) and not has_record_entry(model.config, SKIPPING_KEY):
        raise ValueError("moe_fast.save: patched model lost its config.moe_fast record; call moe_fast.patch again")
    if getattr(model.config, "model_type", None) in supported_model_types():  # what vLLM needs to route as transformers
        get_adapter(model).add_serving_keys(model.config)
    with staged_directory(out, replace=True) as stage:
        tmp = Path(stage)
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    log.info("moe_fast: saved to %s", out)
    return out


_CONFIG_KWARGS = ("revision", "trust_remote_code", "cache_dir", "token", "local_files_only", "subfolder")


def saved_model_class(path: str | os.PathLike, **kwargs):
    """The transformers class a directory was saved from (``config.architectures``), else
    ``AutoModelForCausalLM``: a saved classifier or question-answering model loads as itself."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in _CONFIG_KWARGS})
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoModelForCausalLM


def from_pretrained(path: str | os.PathLike, model_class=None, **kwargs) -> nn.Module:
    """Loads a saved model and, when its config has a ``"moe_fast": {"skipping": ...}`` entry, patches it.

    ``model_class`` defaults to the class it was saved from (:func:`saved_model_class`);
    ``kwargs`` go to its ``from_pretrained`` (dtype, device_map, ...).
    """
    if model_class is None:
        model_class = saved_model_class(path, **kwargs)
    model = load_pretrained(path, model_class, **kwargs)
    if has_record_entry(model.config, SKIPPING_KEY):
        skipping = record_entry(model.config, SKIPPING_KEY)
        if not isinstance(skipping, dict) or "betas" not in skipping:
            raise ValueError(f"moe_fast.from_pretrained: malformed 'moe_fast.skipping' entry in {path}/config.json: {skipping!r}")
        betas = skipping["betas"]
        layers = skipping.get("layers")
        if betas is not None and layers is not None:
            if len(layers) != len(betas):
                raise ValueError(f"moe_fast.from_pretrained: 'moe_fast.skipping' has {len(betas)} betas for {len(layers)} layers")
            betas = {int(layer): b for layer, b in zip(layers, betas)}
        patching.patch(model, betas=betas)
        # Keep what the record said about the calibration (quantile, skip rates).
        set_record_entry(model.config, SKIPPING_KEY, {**skipping, **record_entry(model.config, SKIPPING_KEY)})
    return model
