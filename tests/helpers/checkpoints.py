"""Checkpoints on disk in the Hub layout, for tests that prune or load from a path."""

from __future__ import annotations


def save_checkpoint(model, path, tokenizer=None, shard: str | None = "40KB") -> str:
    """Hub-layout checkpoint of a model (sharded by default), with a tokenizer when given."""
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)
