"""The README's Python example: every name it uses is defined, every moe_fast call fits its signature."""

from __future__ import annotations

import ast
import builtins
import inspect
import os
import re

import moe_fast

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_example() -> str:
    text = open(README, encoding="utf-8").read()
    match = re.search(r"From Python:\s*```python\n(.*?)```", text, re.S)
    assert match, "README has no 'From Python:' example"
    return match.group(1)


def test_readme_python_example_defines_every_name() -> None:
    tree = ast.parse(_python_example())
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert sorted(used - defined) == []


def test_readme_python_example_calls_fit_the_signatures() -> None:
    tree = ast.parse(_python_example())
    calls = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
        and isinstance(n.func.value, ast.Name) and n.func.value.id == "moe_fast"
    ]
    assert {c.func.attr for c in calls} >= {"prune", "load_calibration", "calibrate_skipping", "patch"}
    for call in calls:
        fn = getattr(moe_fast, call.func.attr)
        args = [object() for _ in call.args]
        kwargs = {kw.arg: object() for kw in call.keywords}
        inspect.signature(fn).bind(*args, **kwargs)  # TypeError when the example's call cannot work
