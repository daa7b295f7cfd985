"""agl's import graph: no cycles, and no module imports another module's private names; and no
module outside ``agl/selection`` names a gene-selection method (it asks the gates' traits).

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
# Cycles that exist only through ``if TYPE_CHECKING:`` imports (annotations, never run). Counted, so a
# new one is a decision, not an accident; each is delete-on-fix.
TYPE_CHECKING_CYCLES: list[list[str]] = [["agl.training.checkpoint", "agl.training.loop"]]

# Modules that may name a method (a registered gate) as a string: experiment designs (the study and
# the benchmarks define which methods they run), the default of the ``method`` setting, and one
# unrelated use of the word "probe". Everything else reads the gates' traits (agl.selection.gates_with).
METHOD_NAMES_ALLOWED: dict[str, set[str] | None] = {
    "agl/evaluation/study.py": None,        # None: any method name
    "agl/bench/selection.py": None,
    "agl/bench/core.py": None,
    "agl/bench/sweep.py": None,
    "agl/bench/search.py": None,
    "agl/bench/gpu.py": None,
    "agl/bench/cohort.py": None,
    "agl/config.py": {"dkgsb"},             # TrainConfig's default method
    "agl/models/features.py": {"probe"},    # a cache-key probe, not the probe method
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool,
             type_checking: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import that can run (and, with
    ``type_checking``, those under ``if TYPE_CHECKING:`` too)."""
    out: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
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


def build_graph(type_checking: bool = False) -> tuple[dict[str, set[str]], list[str]]:
    """Edges between agl modules, and every private-name import across modules (``type_checking``:
    count the imports under ``if TYPE_CHECKING:`` as edges too)."""
    files = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    private: list[str] = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, names, line in _imports(tree, name, path.name == "__init__.py", type_checking):
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


def test_type_checking_cycles_are_counted() -> None:
    """Cycles closed only by annotation imports: exactly the known ones (a new one fails; a fixed one too,
    until it is deleted from TYPE_CHECKING_CYCLES)."""
    running, _ = build_graph()
    annotated, _ = build_graph(type_checking=True)
    only_annotations = [c for c in find_cycles(annotated) if c not in find_cycles(running)]
    assert sorted(only_annotations) == sorted(TYPE_CHECKING_CYCLES), (
        f"{len(only_annotations)} TYPE_CHECKING-only cycle(s): " + "; ".join(" <-> ".join(c) for c in only_annotations))


def method_names_outside_selection() -> list[str]:
    """Every string constant outside agl/selection that equals a registered gate's name (not allowed above)."""
    from agl.selection import GATES

    names = set(GATES.names())
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        if rel.startswith("agl/selection/"):
            continue
        allowed = METHOD_NAMES_ALLOWED.get(rel, set())
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, ast.Constant) and node.value in names:
                if allowed is not None and node.value not in allowed:
                    found.append(f"{rel}:{node.lineno}: {node.value!r}")
    return found


def test_no_method_names_outside_selection() -> None:
    found = method_names_outside_selection()
    assert not found, ("a method named outside agl/selection (ask a gate trait instead: agl.selection.gates_with):\n"
                       + "\n".join(found))


def test_the_method_name_check_finds_one(monkeypatch) -> None:
    """The scan sees a name where one is: without its allowance, the study's PGL reference is reported."""
    monkeypatch.delitem(METHOD_NAMES_ALLOWED, "agl/evaluation/study.py")
    assert any(hit.startswith("agl/evaluation/study.py:") and "'pgl'" in hit for hit in method_names_outside_selection())
