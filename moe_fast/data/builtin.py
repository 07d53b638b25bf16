"""Two real-text corpora built from the standard library of the running Python.

``python-prose``: the docstrings (module, class, function) of the standard library modules.
``python-code``: the standard library's source files, verbatim.

Why these: every machine that runs moe_fast has them, they are real text of two clearly
different kinds (so experts can specialise and task-specific pruning has something to find),
and they need no network. They depend on the Python version; the numbers in the docs below are
for CPython 3.11.

Splits are by module, never by line: a stdlib top-level module or package (``email``, ``json``,
``os``...) goes wholly to train, calib or test by a salted SHA-256 of its name (80 / 10 / 10
buckets), identically for both corpora, so no test module's docstrings or code appear in any
training or calibration text. Test suites (``test``, ``*/tests``, ``idle_test``), generated
tables (``encodings``, ``pydoc_data``) and ``site-packages`` are excluded.

Sizes on CPython 3.11.7 (train / calib / test; 152 / 24 / 19 top-level modules):
    python-prose  1.43M / 0.24M / 0.12M characters (about 0.41M / 0.08M / 0.03M tokens of the
                  shipped model's tokenizer)
    python-code   8.11M / 1.09M / 0.70M characters (about 2.25M / 0.31M / 0.2M tokens)
(``python -m moe_fast.data.builtin`` prints the exact figures for your Python.)
Building both takes about 4 s (one ``ast.parse`` per file); results are cached in memory.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import logging
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BUILTIN_CORPORA = ("python-prose", "python-code")
SPLITS = ("train", "calib", "test")
DEFAULT_SPLIT = "calib"  # `--calib builtin:NAME` means the calibration split
_SALT = "moe_fast-builtin-v1"
_EXCLUDED_TOP = {"test", "encodings", "pydoc_data", "site-packages", "__phello__", "idlelib.idle_test"}
_EXCLUDED_DIRS = {"tests", "test", "idle_test", "__pycache__"}
DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Corpus:
    """One built-in corpus: text per split and the modules that went into each split."""

    name: str
    splits: dict[str, str]
    modules: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> top-level modules

    def __getitem__(self, split: str) -> str:
        if split not in self.splits:
            raise KeyError(f"corpus {self.name!r} has no split {split!r}; splits: {', '.join(SPLITS)}")
        return self.splits[split]

    @property
    def train(self) -> str:
        return self.splits["train"]

    @property
    def calib(self) -> str:
        return self.splits["calib"]

    @property
    def test(self) -> str:
        return self.splits["test"]

    def sizes(self) -> dict[str, dict[str, int]]:
        return {s: {"chars": len(self.splits[s]), "modules": len(self.modules.get(s, ()))} for s in SPLITS}


def split_of(module: str) -> str:
    """The split a top-level module belongs to: a fixed salted hash, 80/10/10."""
    bucket = int.from_bytes(hashlib.sha256(f"{_SALT}:{module}".encode()).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "calib" if bucket < 90 else "test"


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files() -> list[tuple[str, str]]:
    """(top-level module, path) of every stdlib source file we use, in a fixed order."""
    root = stdlib_dir()
    names = set(getattr(sys, "stdlib_module_names", ()))
    out: list[tuple[str, str]] = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        top = entry[:-3] if entry.endswith(".py") else entry
        if top in _EXCLUDED_TOP or top.startswith("_sysconfigdata") or (names and top not in names):
            continue
        if os.path.isfile(path) and entry.endswith(".py"):
            out.append((top, path))
        elif os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py")):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
                out.extend((top, os.path.join(dirpath, f)) for f in sorted(filenames) if f.endswith(".py"))
    if not out:
        raise FileNotFoundError(f"no standard library sources found under {root!r} (a Python without its .py files?)")
    return out


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def _docstrings(source: str) -> list[str]:
    """The module, class and function docstrings of one file, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [
        n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    docs = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=False)
        if doc:
            doc = inspect.cleandoc(doc).strip()
            if len(doc) >= 8:
                docs.append(doc)
    return docs


@functools.lru_cache(maxsize=None)
def _build_all() -> dict[str, Corpus]:
    parts: dict[str, dict[str, list[str]]] = {c: {s: [] for s in SPLITS} for c in BUILTIN_CORPORA}
    modules: dict[str, set[str]] = {s: set() for s in SPLITS}
    for top, path in _stdlib_files():
        source = _read(path)
        if source is None or not source.strip():
            continue
        split = split_of(top)
        modules[split].add(top)
        parts["python-code"][split].append(source.strip("\n") + "\n")
        docs = _docstrings(source)
        if docs:
            parts["python-prose"][split].append(DOC_SEPARATOR.join(docs) + "\n")
    mods = {s: tuple(sorted(modules[s])) for s in SPLITS}
    out = {}
    for name in BUILTIN_CORPORA:
        out[name] = Corpus(name, {s: DOC_SEPARATOR.join(parts[name][s]) for s in SPLITS}, mods)
    log.debug("built-in corpora: %s", {n: c.sizes() for n, c in out.items()})
    return out


def parse_builtin_spec(spec: str) -> tuple[str, str | None]:
    """``[builtin:]NAME[:SPLIT]`` -> (NAME, SPLIT or None), with a clear error for unknown names."""
    rest = spec[len("builtin:"):] if spec.startswith("builtin:") else spec
    name, _, split = rest.partition(":")
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r} in {spec!r}; available: {', '.join(BUILTIN_CORPORA)}")
    if split and split not in SPLITS:
        raise ValueError(f"unknown split {split!r} in {spec!r}; splits: {', '.join(SPLITS)}")
    return name, split or None


def get_corpus(name: str) -> Corpus:
    """The whole corpus (all splits) for ``python-prose`` or ``python-code`` (``builtin:`` optional)."""
    return _build_all()[parse_builtin_spec(name)[0]]


def load_builtin(spec: str, split: str | None = None) -> str:
    """Text of one split of a built-in corpus.

    ``spec`` is ``[builtin:]python-prose|python-code[:train|calib|test]``. Without a split in the
    spec or the argument, the calibration split is returned (what ``--calib builtin:NAME`` means);
    ``moe-fast eval --data builtin:NAME`` asks for the test split.
    """
    name, spec_split = parse_builtin_spec(spec)
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    return _build_all()[name][spec_split or split or DEFAULT_SPLIT]


def main() -> None:
    t0 = time.perf_counter()
    corpora = _build_all()
    took = time.perf_counter() - t0
    print(f"Python {sys.version.split()[0]}, stdlib {stdlib_dir()}, built in {took:.1f} s")
    for name, corpus in corpora.items():
        print(name, json.dumps(corpus.sizes()))
    print("test modules:", ", ".join(corpora["python-code"].modules["test"]))
    print("calib modules:", ", ".join(corpora["python-code"].modules["calib"]))


if __name__ == "__main__":
    main()
