"""Built-in corpora: real text taken from the Python installation, nothing downloaded."""

from __future__ import annotations

from moe_fast.data.builtin import BUILTIN_CORPORA, SPLITS, Corpus, get_corpus, load_builtin, parse_builtin_spec

__all__ = ["BUILTIN_CORPORA", "SPLITS", "Corpus", "get_corpus", "load_builtin", "parse_builtin_spec"]
