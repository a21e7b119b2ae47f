"""The project's modules import each other without a circle and only downwards, counting imports inside
functions too: the toolkit (itk/) may import the doctor checks (checks/) and the generator (runtime/), the checks
only the generator, and the generator nothing of either.

A circle or an upward import hidden behind a function-level import still couples two modules both ways (and
breaks the day someone moves the import to the top); only `if TYPE_CHECKING:` imports are left out, as they
never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = {"itk": ROOT / "itk", "itk.checks": ROOT / "checks", "itk.runtime": ROOT / "runtime"}


def module_files() -> dict[str, Path]:
    mods = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run (those under `if TYPE_CHECKING:` cannot)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif node.module:
                deps |= {node.module} & set(mods)
                deps |= {f"{node.module}.{a.name}" for a in node.names} & set(mods)
        graph[name] = deps - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return found


# From the top layer down: a module may import its own layer and those below it.
LAYERS = ("itk", "itk.checks", "itk.runtime")


def layer_of(module: str) -> int:
    """The index in LAYERS of the package a module belongs to (the longest matching prefix)."""
    return max(i for i, package in enumerate(LAYERS) if module == package or module.startswith(package + "."))


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a lower layer imports a higher one."""
    return sorted((a, b) for a, deps in graph.items() for b in deps if layer_of(b) < layer_of(a))


def test_imports_only_point_down_from_the_toolkit_to_the_checks_to_the_runtime():
    assert upward_imports(import_graph()) == []


def test_the_direction_rule_sees_the_runtime_importing_the_toolkit_or_the_checks():
    graph = {"itk.runtime.engine": {"itk.run"}, "itk.checks.gpu": {"itk.runtime.protocol"},
             "itk.run": {"itk.checks.gpu", "itk.runtime.protocol"}, "itk.runtime.request": {"itk.checks.ram"}}
    assert upward_imports(graph) == [("itk.runtime.engine", "itk.run"), ("itk.runtime.request", "itk.checks.ram")]


def test_no_two_modules_of_the_project_import_each_other_even_through_a_chain():
    assert circles(import_graph()) == []


def test_the_circle_finder_sees_a_circle_made_of_function_level_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\ndef f():\n    import y\n")
    assert [n.names[0].name for n in runtime_imports(tree)] == ["TYPE_CHECKING", "y"]
