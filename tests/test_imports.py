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
    assert f"{PACKAGE}.models" in graph[f"{PACKAGE}.commands.prune"]  # imported inside run()
    assert f"{PACKAGE}.ops" in graph[f"{PACKAGE}.patching"]


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
    from moe_fast.routing_runtime (and the op's result type from moe_fast.ops). Only the package
    itself imports it, to offer ``moe_fast.reference`` to users."""
    spec = f"{PACKAGE}.reference"
    users = sorted(module for module, targets in import_graph().items() if spec in targets and module != PACKAGE)
    assert not users, "library modules import the spec: " + ", ".join(users)
    assert f"{PACKAGE}.routing_runtime" in import_graph()[f"{PACKAGE}.layer_routing"]
