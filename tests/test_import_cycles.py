"""No import circles inside the project's packages: every module's imports form a graph without cycles.

A circle works in Python only while the order of first imports happens to suit it, and it ties two
modules' jobs together so neither can be read, tested or moved alone. The graph is read from the
source: every import statement, the ones inside functions and under `if TYPE_CHECKING:` too (a lazy
import breaks nothing at start-up but keeps the two modules each other's dependency all the same).

An edge goes to the module an import names: `from pkg import name` points to `pkg.name` when that is a
module, else to `pkg` (its `__init__`). Python also runs the parent packages' `__init__` of every module
it imports; those are not edges, since they run first and finish before the child, whatever they import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_kit", "device_agent", "calibration", "harness")

Graph = dict[str, dict[str, int]]  # module -> {imported module: line of the first such import}


def modules_under(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted name -> file, for every module of `packages` under `root`."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def import_graph(root: Path, packages: Iterable[str]) -> Graph:
    modules = modules_under(root, packages)
    graph: Graph = {m: {} for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    # `import a.b.c` imports the deepest of a.b.c, a.b, a that is one of ours
                    targets.extend(next(([".".join(parts[:i])] for i in range(len(parts), 0, -1)
                                         if ".".join(parts[:i]) in modules), []))
            else:
                base = node.module or ""
                if node.level:
                    base = _resolve_relative(module, path.name == "__init__.py", node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target in modules and target != module:
                    graph[module].setdefault(target, node.lineno)
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def connect(v: str) -> None:  # Tarjan's algorithm, iteratively (the graph may be deep)
        nonlocal counter
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, set(c), c[0]) for c in components]


def _cycle_in(graph: Graph, component: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in component:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe(graph: Graph, cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in pairwise(cycle)) + f" -> {cycle[-1]}"


@pytest.fixture(scope="module")
def project_graph() -> Graph:
    return import_graph(REPO, PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package: str, project_graph: Graph) -> None:
    graph = project_graph
    cycles = [c for c in find_cycles(graph) if {m.split(".")[0] for m in c} == {package}]
    assert not cycles, "import cycles:\n" + "\n".join(describe(graph, c) for c in cycles)


def test_no_import_cycle_between_the_packages(project_graph: Graph) -> None:
    graph = project_graph
    cycles = [c for c in find_cycles(graph) if len({m.split(".")[0] for m in c}) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(describe(graph, c) for c in cycles)


def test_the_check_finds_a_planted_cycle(tmp_path: Path) -> None:
    """Not vacuous: a circle through a lazy import, a relative one and a package re-export is found and named."""
    pkg = tmp_path / "planted"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from planted.front import Front\n")  # a re-export
    (pkg / "front.py").write_text("from .sub import worker\n\nclass Front: ...\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "worker.py").write_text("def job():\n    from planted import Front  # lazy, through __init__\n")
    (pkg / "leaf.py").write_text("import planted.sub.worker\n")  # imports into the circle, not part of it
    graph = import_graph(tmp_path, ["planted"])
    assert graph["planted.front"] == {"planted.sub.worker": 1}
    assert graph["planted.leaf"] == {"planted.sub.worker": 1}
    cycles = find_cycles(graph)
    assert cycles == [["planted", "planted.front", "planted.sub.worker", "planted"]]
    assert describe(graph, cycles[0]) == ("planted (line 1) -> planted.front (line 1) -> "
                                          "planted.sub.worker (line 2) -> planted")
    # Cut the lazy import and the package is clean.
    (pkg / "sub" / "worker.py").write_text("def job():\n    return 1\n")
    assert find_cycles(import_graph(tmp_path, ["planted"])) == []
