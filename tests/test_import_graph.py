"""The project's import graph is a DAG: no module imports (directly or through others) one that imports it.

Every ``import``/``from ... import`` of a project module counts, also those inside functions and under
``TYPE_CHECKING``: a cycle hidden behind a late import is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("app", "models", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``path`` imports; ``from pkg import mod`` counts as importing ``pkg.mod``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_are_resolved_to_project_modules():
    modules = project_modules()
    graph = {name: imports_of(path, name, set(modules)) for name, path in modules.items()}
    assert "app.pipeline.frames" in graph["app.pipeline.sources"]
    assert "models" in graph["app.pipeline.factory"] or "models.checkpoint" in graph["app.pipeline.factory"]


def test_the_import_graph_has_no_cycle():
    modules = project_modules()
    graph = {name: imports_of(path, name, set(modules)) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_frames_module_imports_nothing_from_the_project():
    modules = project_modules()
    assert imports_of(modules["app.pipeline.frames"], "app.pipeline.frames", set(modules)) == set()
    assert imports_of(modules["app.errors"], "app.errors", set(modules)) == set()
