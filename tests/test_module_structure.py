"""The code's shape, checked from its own source: no import cycles, no HTTP in the core, no
oversized modules.

The import graph is read with ``ast`` from every module of ``gateway/``, ``workers/`` and
``pricing/`` (imports inside functions included: a cycle hidden in a function is still a
cycle; those under ``if TYPE_CHECKING:`` excluded: they never run). ``import a.b`` and
``from a import b`` point at the most specific module that exists.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "workers", "pricing")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name an import statement in ``tree`` may load, at any depth."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets: set[str] = set()
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            # ``from a import b``: b is a module if one exists, else a name in a.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_modules_import_each_other_without_a_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions() -> None:
    tree = ast.parse("def f():\n    from gateway import db\n")
    assert "gateway.db" in _imported_names(tree, "gateway.x", False)


def test_no_module_is_over_450_lines_unless_its_docstring_says_why() -> None:
    # A docstring that says why names the limit: "over 450 lines because ...".
    too_long = []
    for name, path in _modules().items():
        source = path.read_text()
        lines = source.count("\n")
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if lines > MAX_LINES and f"over {MAX_LINES} lines" not in docstring.lower():
            too_long.append(f"{name} ({lines} lines)")
    assert not too_long, "modules over 450 lines with no reason in their docstring: " + ", ".join(
        too_long
    )


# The route layer: what loads litestar and speaks HTTP (docs/architecture.md).
ROUTE_LAYER = frozenset({"gateway.app", "gateway.deps", "gateway.responses", "gateway.admin"})


def _is_route_layer(module: str) -> bool:
    return module in ROUTE_LAYER or module.endswith(".routes") or module.startswith("gateway.cli")


def reached_from(graph: dict[str, set[str]], start: list[str]) -> set[str]:
    reached: set[str] = set()
    stack = list(start)
    while stack:
        for target in graph[stack.pop()]:
            if target not in reached:
                reached.add(target)
                stack.append(target)
    return reached


def test_no_worker_module_reaches_the_route_layer() -> None:
    graph = import_graph()
    # The simulator is an upstream's stand-in, an HTTP server of its own.
    workers = [
        m for m in graph if m.startswith("workers") and not m.startswith("workers.simulator")
    ]
    assert sorted(filter(_is_route_layer, reached_from(graph, workers))) == []
    # The check sees the route layer where it is.
    assert "gateway.deps" in reached_from(graph, ["gateway.app"])


def test_importing_the_task_lifecycle_loads_no_http_framework() -> None:
    # Workers import the lifecycle; the route layer (litestar) must stay out of them.
    probe = (
        "import sys, gateway.tasks.lifecycle, gateway.callbacks.service; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'litestar'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
