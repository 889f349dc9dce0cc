"""lmqa/engine/ imports form no circle, and no module reaches for another's
private names: read from the modules' source (ast), imports inside functions
and typing-only imports (under `if TYPE_CHECKING:`) included: a module that
needs another's names only for its types still cannot be read, checked or
changed without it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "lmqa" / "engine"
PACKAGE = "lmqa.engine"


def _imports(node: ast.AST):
    """Every import node under node."""
    return (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))


def engine_imports(source: str) -> dict[str, set[str]]:
    """Engine module -> names imported from it, for one module's source (a
    bare `import` or `from . import m` counts as the whole module: name '*')."""
    out: dict[str, set[str]] = {}
    for node in _imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(PACKAGE + "."):
                    out.setdefault(alias.name.split(".")[2], set()).add("*")
            continue
        base = f"{PACKAGE}.{node.module}" if node.level == 1 and node.module else (
            PACKAGE if node.level == 1 else node.module or "")
        if base == PACKAGE:  # from . import m / from lmqa.engine import m
            for alias in node.names:
                out.setdefault(alias.name, set()).add("*")
        elif base.startswith(PACKAGE + "."):
            out.setdefault(base.split(".")[2], set()).update(a.name for a in node.names)
    return out


def import_graph() -> dict[str, dict[str, set[str]]]:
    return {p.stem: engine_imports(p.read_text()) for p in sorted(ENGINE.glob("*.py")) if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle in a directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_reader_sees_imports_of_every_form():
    src = """
from __future__ import annotations
from typing import TYPE_CHECKING
import lmqa.engine.a
from . import b
from .c import x, _y
from lmqa.engine.d import z
from lmqa.engine import e
if TYPE_CHECKING:
    from .f import F
def g():
    from .h import H
"""
    got = engine_imports(src)
    assert got == {"a": {"*"}, "b": {"*"}, "c": {"x", "_y"}, "d": {"z"}, "e": {"*"}, "f": {"F"}, "h": {"H"}}


@pytest.mark.parametrize("graph, circle", [({"a": {"b"}, "b": {"c"}, "c": set()}, None),
                                           ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"])])
def test_find_cycle(graph, circle):
    assert find_cycle(graph) == circle


def test_engine_modules_import_no_circle():
    graph = import_graph()
    assert {"landmark_engine", "graph_decode", "step", "cache", "retrieval", "plan", "landmark_scoring", "positions"} <= set(graph)
    assert find_cycle({m: set(deps) for m, deps in graph.items()}) is None


def test_no_engine_module_imports_anothers_private_names():
    private = {(m, dep, name) for m, deps in import_graph().items() for dep, names in deps.items()
               for name in names if name.startswith("_")}
    assert not private
