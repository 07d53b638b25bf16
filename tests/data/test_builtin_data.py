"""The built-in corpora: real stdlib text, deterministic, split by module with no overlap."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sysconfig

import pytest

from moe_fast.data import builtin
from moe_fast.data.builtin import SPLITS, get_corpus, load_builtin, parse_builtin_spec


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="module")
def corpora():
    return {name: get_corpus(name) for name in builtin.BUILTIN_CORPORA}


def test_rebuild_is_identical(corpora):
    fresh = builtin._build_all.__wrapped__()  # bypasses the in-memory cache
    for name, corpus in corpora.items():
        for split in SPLITS:
            assert _digest(fresh[name][split]) == _digest(corpus[split]), (name, split)


def test_splits_partition_modules(corpora):
    mods = corpora["python-code"].modules
    sets = [set(mods[s]) for s in SPLITS]
    assert all(sets), "every split needs modules"
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert corpora["python-prose"].modules == mods  # both corpora split the same way
    # train holds most of it; the held-out splits are real text of useful size
    for name, corpus in corpora.items():
        sizes = corpus.sizes()
        assert sizes["train"]["chars"] > 4 * sizes["test"]["chars"] > 0, (name, sizes)
        assert sizes["calib"]["chars"] > 50_000 and sizes["test"]["chars"] > 50_000, (name, sizes)


def _stdlib_source(module: str) -> tuple[str, str]:
    """(relative path, text) of a stdlib module's own file, found without the code under test."""
    root = sysconfig.get_paths()["stdlib"]
    for rel in (module + ".py", os.path.join(module, "__init__.py")):
        path = os.path.join(root, rel)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return rel, f.read()
    pytest.skip(f"no source for {module}")


@pytest.mark.parametrize("module", ["json", "argparse", "random", "email", "textwrap", "difflib"])
def test_each_module_is_in_exactly_one_split(corpora, module):
    _, source = _stdlib_source(module)
    code = corpora["python-code"]
    where = [s for s in SPLITS if source.strip("\n") in code[s]]
    assert len(where) == 1, (module, where)
    assert module in code.modules[where[0]]
    doc = inspect.cleandoc(importlib.import_module(module).__doc__ or "")
    if doc:
        prose = corpora["python-prose"]
        assert [s for s in SPLITS if doc in prose[s]] == where, module


def test_prose_is_docstrings_not_code(corpora):
    prose, code = corpora["python-prose"].train, corpora["python-code"].train
    assert prose.count("\ndef ") < 0.001 * prose.count("\n")
    assert code.count("\ndef ") > 0.01 * code.count("\n")
    assert len(prose) < len(code)


def test_specs(corpora):
    assert parse_builtin_spec("builtin:python-code:test") == ("python-code", "test")
    assert parse_builtin_spec("python-prose") == ("python-prose", None)
    assert load_builtin("builtin:python-code") == corpora["python-code"].calib  # calibration by default
    assert load_builtin("python-prose:test") == corpora["python-prose"].test
    assert load_builtin("builtin:python-prose", split="train") == corpora["python-prose"].train
    with pytest.raises(ValueError, match="unknown built-in corpus"):
        load_builtin("builtin:c4")
    with pytest.raises(ValueError, match="unknown split"):
        load_builtin("builtin:python-code:dev")
