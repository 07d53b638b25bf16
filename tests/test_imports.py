"""Imports run one way: the command line -> library modules -> ops -> the compiled extension.

Why a test: an import cycle is dodged once with an import inside a function, and then nothing
shows that two modules have stopped having an order. Every ``import`` counts here, also those
inside functions. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "moe_fast"
PACKAGE = PACKAGE_DIR.name
# The command line: the only modules that may import moe_fast.cli or moe_fast.commands.
CLI_MODULES = {f"{PACKAGE}.cli", f"{PACKAGE}.commands", f"{PACKAGE}.__main__"}


def module_names() -> dict[str, Path]:
    """{dotted module name: file} of every Python module of the package."""
    names = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def compiled_names() -> set[str]:
    """The compiled extension modules (``moe_fast._C``): leaves of the graph, importing nothing here."""
    found = set()
    for pattern in ("*.so", "*.pyd"):
        for path in PACKAGE_DIR.rglob(pattern):
            parts = list(path.relative_to(PACKAGE_DIR.parent).parts)
            parts[-1] = parts[-1].split(".")[0]
            found.add(".".join(parts))
    return found | {f"{PACKAGE}._C"}  # also before a build


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name a (possibly relative) ``from X import ...`` refers to."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its body (functions included).

    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``. The
    implicit import of parent packages is left out: a package's ``__init__`` importing its own
    submodules is no cycle.
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path, node)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.c of a name: the nearest module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    known = set(names) | compiled_names()
    return {module: imported_modules(module, path, known) for module, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _is_cli(module: str) -> bool:
    return any(module == cli or module.startswith(cli + ".") for cli in CLI_MODULES)


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert f"{PACKAGE}.pruning" in graph[f"{PACKAGE}.commands.prune"]  # imported inside run_prune()
    assert f"{PACKAGE}.kernels.ops" in graph[f"{PACKAGE}.serving.patching"]


def test_no_import_cycle_among_moe_fast_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_command_line_imports_the_command_line():
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        if not _is_cli(module)
        for target in targets
        if _is_cli(target)
    )
    assert not wrong, "library modules import the command line: " + "; ".join(wrong)


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_code_runs_no_part_of_the_spec():
    """moe_fast.reference is the specification the tests import: library modules take what they run
    from moe_fast.routing.runtime (and the op's result type from moe_fast.ops). Only the package
    itself imports it, and its public alias module ``moe_fast.reference``, to offer it to users."""
    spec = f"{PACKAGE}.kernels.reference"
    offering = (PACKAGE, f"{PACKAGE}.reference")
    users = sorted(module for module, targets in import_graph().items() if spec in targets and module not in offering)
    assert not users, "library modules import the spec: " + ", ".join(users)
    assert f"{PACKAGE}.routing.runtime" in import_graph()[f"{PACKAGE}.routing.layer_routing"]


# Why an import of a moe_fast module may stay inside a function, said on its line: "# lazy: ..." (kept
# out of a start-up: transformers out of `import moe_fast`, the jobs out of the CLI's parser),
# "# cycle: ..." (the module named imports this one) or "# optional ...".
REASONS = ("# lazy:", "# cycle:", "# optional")


def local_imports_without_a_reason(path: Path, module: str) -> list[int]:
    """The line of each import of a moe_fast module inside a function whose line gives no reason."""
    lines = path.read_text().splitlines()
    found = []

    def visit(node: ast.AST, inside: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if inside and isinstance(child, (ast.Import, ast.ImportFrom)):
                names = (
                    [alias.name for alias in child.names]
                    if isinstance(child, ast.Import)
                    else [_absolute(module, path, child)]
                )
                ours = any(name == PACKAGE or name.startswith(PACKAGE + ".") for name in names)
                text = " ".join(lines[child.lineno - 1 : child.end_lineno])
                if ours and not any(reason in text for reason in REASONS):
                    found.append(child.lineno)
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def test_imports_of_moe_fast_modules_sit_in_the_header():
    """A module's header says what it depends on: an import of a moe_fast module inside a function
    says on its line why it cannot be at the top (``# lazy:``, ``# cycle:`` or ``# optional``)."""
    wrong = [
        f"{path.relative_to(PACKAGE_DIR.parent)}:{line}"
        for module, path in module_names().items()
        for line in local_imports_without_a_reason(path, module)
    ]
    assert not wrong, "imports of moe_fast modules inside functions, with no '# lazy:'/'# cycle:' reason: " + ", ".join(wrong)


def test_the_header_rule_sees_an_import_inside_a_function(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import os\n\n\ndef f():\n    from moe_fast import ops\n    from moe_fast.models import x  # lazy: start-up\n"
        "    import moe_fast.pruning.export\n    from . import staging  # cycle: staging imports this module\n"
        "    from . import reference\n    import json\n"
    )
    assert local_imports_without_a_reason(bad, f"{PACKAGE}.bad") == [5, 7, 9]
