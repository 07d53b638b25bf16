"""Checkpoints on disk in the Hub layout, for tests that prune or load from a path."""

from __future__ import annotations


def save_checkpoint(model, path, tokenizer=None, shard: str | None = "40KB") -> str:
    """Hub-layout checkpoint of a model (sharded by default), with a tokenizer when given."""
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def save_pruning_checkpoint(tmp_path) -> tuple[str, str]:
    """The command-line pruning tests' input: a sharded 4-layer tiny Mixtral in ``tmp_path/src``
    and 8 x 16 calibration ids in ``tmp_path/ids.pt``; returns (model folder, ids file)."""
    import torch

    from helpers.tiny_models import tiny_mixtral

    src = save_checkpoint(tiny_mixtral(11, layers=4), tmp_path / "src")
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    return src, str(tmp_path / "ids.pt")
