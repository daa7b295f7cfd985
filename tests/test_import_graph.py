"""agl's import graph: no cycles, and no module imports another module's private names.

The graph is read statically (ast over agl/**/*.py): every ``import`` and ``from ... import``,
at module level or inside a function (a lazy import still ties the two modules together),
except imports under ``if TYPE_CHECKING:``, which never run. Importing ``agl.a.b`` also runs
the package ``agl.a``'s ``__init__``; edges go to the module named, which is where the code is.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "agl"

# Known leftovers, each deleted with the change that removes it; anything not listed here fails
# the tests below. (Empty since the tracking seam: agl.tracking.)
PENDING_CYCLES: list[list[str]] = []
PENDING_PRIVATE: list[str] = []
PENDING_LAYERING: dict[str, set[str]] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import that can run."""
    out: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def build_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges between agl modules, and every private-name import across modules."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    private: list[str] = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, names, line in _imports(tree, name, path.name == "__init__.py"):
            if not (target == "agl" or target.startswith("agl.")):
                continue
            for taken in names or [""]:
                # ``from agl.x import y`` where y is a submodule: the edge goes to agl.x.y
                sub = f"{target}.{taken}" if taken else target
                dest = sub if sub in files else target
                if dest in files and dest != name:
                    graph[name].add(dest)
                if taken.startswith("_") and not taken.startswith("__") and dest != name:
                    private.append(f"{path.relative_to(PACKAGE.parent)}: from {target} import {taken}  (line {line})")
    return graph, private


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def test_the_graph_is_read() -> None:
    graph, _ = build_graph()
    # known edges, so that a parser that finds nothing cannot pass the tests below
    assert "agl.config" in graph["agl.training.loop"]
    assert "agl.checks" in graph["agl.selection.base"]
    assert "agl.training.losses" in graph["agl.config"]  # a function-local import counts


def test_find_cycles_finds_one() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph, _ = build_graph()
    cycles = [c for c in find_cycles(graph) if c not in PENDING_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_across_modules() -> None:
    _, private = build_graph()
    private = [p for p in private if p.split("  (line")[0] not in PENDING_PRIVATE]
    assert not private, "private names imported from another module:\n" + "\n".join(private)


@pytest.mark.parametrize("module", ["agl.predict", "agl.tracking", "agl.tracking.base", "agl.tracking.memory",
                                    "agl.tracking.mlflow_backend", "agl.tracking.pyfunc", "agl.runs"])
def test_predict_does_not_import_the_distributed_layer(module: str) -> None:
    graph, _ = build_graph()
    upward = {m for m in graph[module] if m.startswith("agl.distributed")} - PENDING_LAYERING.get(module, set())
    assert not upward, upward
