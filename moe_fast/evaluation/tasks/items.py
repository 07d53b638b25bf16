"""The built-in multiple-choice tasks, built from the standard library's **test** modules.

Why: accuracy needs questions with one right answer, and a fresh clone has no network. The
standard library's sources are on every machine, and the test split's modules (see
:mod:`moe_fast.data.builtin`) are never seen by training or calibration, so these items are held
out from everything the shipped models and the demo's pruning saw.

``moe_fast_next_line``: the preceding lines (at most :data:`CONTEXT_LINES`) of a function, and
the true next line among 4. Distractors are lines of other test modules whose stripped length
falls in the same band, re-indented like the true line (indentation gives nothing away), never
equal to it.

``moe_fast_docstring``: a paragraph of a function's or class's docstring, and the ``def`` /
``class`` line it documents among 4 (distractors: documented definitions of other test modules,
same band of length, never equal). Every paragraph of a docstring is an item: the test modules
hold about 500 documented definitions, too few for 1,000 items with one each.

Everything is fixed by the Python installation alone: files in sorted order, choices drawn with
``random.Random`` seeded by a SHA-256 of the item's id.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import os
import random
from dataclasses import asdict, dataclass

from moe_fast.data.builtin import _read, _stdlib_files, split_of, stdlib_dir

TASKS = ("moe_fast_next_line", "moe_fast_docstring")
NUM_CHOICES = 4
CONTEXT_LINES = 6  # preceding lines of the function shown in a next-line item
MIN_LINE, MAX_LINE = 8, 100  # stripped length of an answer line
MAX_PARAGRAPH = 240  # characters of a docstring piece (a longer paragraph gives several items)
LINES_PER_TARGET = 8  # about one next-line item per this many candidate lines of a function
_SALT = "moe_fast-tasks-v1"


@dataclass(frozen=True)
class Item:
    """One question: ``context`` then one of ``choices``; ``gold`` indexes the right one."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["choices"] = list(self.choices)
        return d


def _band(text: str) -> int:
    """Length band of a stripped answer: distractors come from the same one, so length tells little."""
    n = len(text)
    return 0 if n < 16 else 1 if n < 24 else 2 if n < 36 else 3 if n < 52 else 4 if n < 72 else 5


def _rng(item_id: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{_SALT}:{item_id}".encode()).digest()[:8], "big"))


@dataclass(frozen=True)
class _Def:
    module: str  # top-level module
    name: str  # file-relative id: path:line
    lines: tuple[str, ...]  # the definition's source lines
    header: str  # the def / class line, normalised
    doc: str | None
    strings: frozenset[int]  # line offsets (in ``lines``) inside multi-line string literals


def _header(node: ast.AST) -> str:
    """``def name(args) -> ret:`` or ``class Name(bases):`` rebuilt from the AST (one line, no decorators)."""
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases + node.keywords)
        return f"class {node.name}({bases}):" if bases else f"class {node.name}:"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){ret}:"


@functools.lru_cache(maxsize=1)
def _definitions() -> tuple[_Def, ...]:
    """Every function and class of the test split's modules, in file and source order."""
    root = stdlib_dir()
    out: list[_Def] = []
    for top, path in _stdlib_files():
        if split_of(top) != "test":
            continue
        source = _read(path)
        if not source:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        for node in sorted((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))),
                           key=lambda n: n.lineno):
            doc = ast.get_docstring(node, clean=False)
            strings = frozenset(
                i - node.lineno for s in ast.walk(node) if isinstance(s, ast.Constant) and isinstance(s.value, str)
                and s.end_lineno > s.lineno for i in range(s.lineno, s.end_lineno + 1)
            )
            out.append(_Def(top, f"{rel}:{node.lineno}", tuple(lines[node.lineno - 1 : node.end_lineno]),
                            _header(node), inspect.cleandoc(doc).strip() if doc else None, strings))
    return tuple(out)


def _answer_line(line: str) -> bool:
    s = line.strip()
    return MIN_LINE <= len(s) <= MAX_LINE and not s.startswith(("#", '"""', "'''")) and s.isascii()


def _distractors(rng: random.Random, pool: list[tuple[str, str]], module: str, true: str, n: int) -> list[str] | None:
    """``n`` distinct texts of ``pool`` [(module, text)] from other modules, none equal to ``true``."""
    picks: list[str] = []
    for _ in range(50 * n):
        other_module, text = pool[rng.randrange(len(pool))]
        if other_module != module and text != true and text not in picks:
            picks.append(text)
            if len(picks) == n:
                return picks
    return None


def _assemble(item_id: str, context: str, true: str, wrong: list[str], rng: random.Random, prefix: str = "") -> Item:
    gold = rng.randrange(NUM_CHOICES)
    choices = list(wrong)
    choices.insert(gold, true)
    return Item(item_id, context, tuple(prefix + c for c in choices), gold)


@functools.lru_cache(maxsize=None)
def next_line_items() -> tuple[Item, ...]:
    """``moe_fast_next_line``: about one item per :data:`LINES_PER_TARGET` candidate lines of each function."""
    defs = [d for d in _definitions() if d.header.startswith(("def", "async def"))]
    pool: dict[int, list[tuple[str, str]]] = {}
    for d in defs:
        for i, line in enumerate(d.lines):
            if i > 0 and i not in d.strings and _answer_line(line):
                pool.setdefault(_band(line.strip()), []).append((d.module, line.strip()))
    items: list[Item] = []
    for d in defs:
        candidates = [i for i in range(1, len(d.lines)) if i not in d.strings and _answer_line(d.lines[i])]
        if not candidates:
            continue
        rng = _rng(f"next_line:{d.name}")
        count = min(len(candidates), max(1, len(candidates) // LINES_PER_TARGET))
        for i in sorted(rng.sample(candidates, count)):
            line = d.lines[i]
            true = line.strip()
            indent = line[: len(line) - len(line.lstrip())]
            wrong = _distractors(rng, pool[_band(true)], d.module, true, NUM_CHOICES - 1)
            if wrong is None:
                continue
            context = "\n".join(d.lines[max(0, i - CONTEXT_LINES) : i]) + "\n"
            items.append(_assemble(f"{d.name}+{i}", context, true, wrong, rng, indent))
    return tuple(items)


def _paragraphs(doc: str) -> list[str]:
    """The docstring's paragraphs, a long one cut at line ends into pieces of at most :data:`MAX_PARAGRAPH`."""
    out = []
    for para in doc.split("\n\n"):
        piece = ""
        for line in para.strip().splitlines():
            if piece and len(piece) + 1 + len(line) > MAX_PARAGRAPH:
                out.append(piece)
                piece = ""
            piece = f"{piece}\n{line}" if piece else line[:MAX_PARAGRAPH]
        out.append(piece)
    return [p for p in out if len(p) >= 16 and p.isascii()]


@functools.lru_cache(maxsize=None)
def docstring_items() -> tuple[Item, ...]:
    """``moe_fast_docstring``: one item per paragraph of each documented definition's docstring."""
    defs = [d for d in _definitions() if d.doc and d.header.isascii()]
    pool: dict[int, list[tuple[str, str]]] = {}
    for d in defs:
        pool.setdefault(_band(d.header), []).append((d.module, d.header))
    items: list[Item] = []
    for d in defs:
        for j, para in enumerate(_paragraphs(d.doc)):
            item_id = f"{d.name}#{j}"
            rng = _rng(f"docstring:{item_id}")
            wrong = _distractors(rng, pool[_band(d.header)], d.module, d.header, NUM_CHOICES - 1)
            if wrong is None:
                continue
            items.append(_assemble(item_id, f'"""{para}"""\n', d.header, wrong, rng))
    return tuple(items)


def task_items(task: str) -> tuple[Item, ...]:
    """The items of one built-in task, in their fixed order."""
    if task == "moe_fast_next_line":
        return next_line_items()
    if task == "moe_fast_docstring":
        return docstring_items()
    raise ValueError(f"unknown built-in task {task!r}; built-in tasks: {', '.join(TASKS)}")
