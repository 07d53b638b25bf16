"""Every package moe_fast imports is one pip installs for it: a core dependency, or an extra.

Why a test: an import added in a function runs only when that job runs, so a user who installed
with pip (not scripts/install.sh) meets the missing package after minutes of work. Reads the
package's source (every import, also inside functions) and pyproject.toml; checks that core code
imports only core dependencies at module level, that each optional package belongs to the extra
that moe_fast.host.extras names for it, and that a missing extra stops the demo before any work.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from moe_fast.host.extras import EXTRAS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "moe_fast"
# Packages that load moe_fast rather than the other way round: imported only by the plugin folder
# that the host finds through its entry point, never a requirement of moe_fast itself.
HOSTS = {"vllm": "moe_fast/serving/vllm_plugin/"}


def _requirement_name(req: str) -> str:
    """'transformers>=5.7' -> 'transformers' (normalized as PyPI does)."""
    name = re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module name, imported at module level?) for every absolute import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try))
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], top))
            visit(child, inside)

    visit(tree, True)
    return found


def _third_party_imports() -> dict[str, dict[str, bool]]:
    """{import name: {file: imported at module level somewhere in it}} outside the stdlib and moe_fast."""
    out: dict[str, dict[str, bool]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for name, top in _imports(path):
            if name in sys.stdlib_module_names or name in ("moe_fast", "__future__"):
                continue
            files = out.setdefault(name, {})
            rel = str(path.relative_to(ROOT))
            files[rel] = files.get(rel, False) or top
    return out


def _distribution(import_name: str, installed: bool = True) -> str:
    """The distribution that provides a module; for an extra's module that is not installed here,
    its import name normalized as PyPI does (matplotlib, datasets, lm_eval -> lm-eval)."""
    dists = md.packages_distributions().get(import_name)
    if not dists and not installed:
        return _requirement_name(import_name)
    assert dists, f"moe_fast imports {import_name!r}, which no installed distribution provides"
    return _requirement_name(dists[0])


def test_extras_map_declared_extras():
    declared = _pyproject()["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert extra in declared, f"moe_fast.host.extras names extra {extra!r}, pyproject.toml lacks it"
        wanted = {_requirement_name(r) for r in declared[extra]}
        for module in modules:
            assert _distribution(module, installed=False) in wanted, f"{module} is not installed by moe_fast[{extra}]"


def test_every_import_is_declared():
    project = _pyproject()
    core = {_requirement_name(r) for r in project["dependencies"]}
    optional = {module for modules in EXTRAS.values() for module in modules}
    imports = _third_party_imports()
    assert "torch" in imports and "transformers" in imports  # the walk saw the package's imports
    for name, files in imports.items():
        if name in HOSTS:
            outside = [f for f in files if not f.startswith(HOSTS[name])]
            assert not outside, f"{name!r} is imported outside {HOSTS[name]}: {outside}"
            continue
        if name in optional:
            at_top = [f for f, top in files.items() if top]
            assert not at_top, f"optional {name!r} imported at module level in {at_top}: import moe_fast would need it"
            continue
        assert _distribution(name) in core, (
            f"{name!r} (in {sorted(files)}) is neither a dependency in pyproject.toml nor an extra in moe_fast/host/extras.py"
        )


def test_walk_finds_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import numpy\ndef f():\n    import matplotlib.pyplot as plt\ntry:\n    import yaml\nexcept ImportError:\n    pass\n")
    assert sorted(_imports(source)) == [("matplotlib", False), ("numpy", True), ("yaml", False)]


def test_demo_without_its_extra_stops_before_work(tmp_path):
    """matplotlib hidden: one line naming the extra, rc 2, no report folder, within seconds."""
    out = tmp_path / "report"
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from moe_fast.cli import main\n"
        f"sys.exit(main(['demo', '--quick', '--out', {str(out)!r}]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["moe-fast demo: error: the demo needs matplotlib, which is not installed: pip install 'moe_fast[demo]'"]
    assert not out.exists()


def test_require_unknown_extra():
    from moe_fast.host.extras import missing_modules

    with pytest.raises(KeyError, match="unknown extra 'nope'"):
        missing_modules("nope")
