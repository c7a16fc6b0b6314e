"""No import cycles among magitrain's modules, counting imports inside functions too (a deferred
import hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
import os

from conftest import REPO

PACKAGES = {"magitrain": "magitrain", "magitrain.parallel": "parallel", "magitrain.data_pipeline": "data_pipeline",
            "magitrain.launch": "launch"}


def module_files() -> dict[str, str]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith(".py"):
                mods[pkg if name == "__init__.py" else f"{pkg}.{name[:-3]}"] = os.path.join(REPO, folder, name)
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the magitrain modules it imports anywhere in its file (packages' __init__ excluded)."""
    mods = module_files()
    graph = {}
    for name, path in mods.items():
        deps = set()
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            else:
                continue
            deps.update(m for m in named if m in mods and m != name and m not in PACKAGES)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "magitrain.distill" in graph and "magitrain.config" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_config_is_the_root():
    """The schema imports no other magitrain module: every module may import it."""
    assert import_graph()["magitrain.config"] == set()
