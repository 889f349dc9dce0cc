"""No import circle among lmqa's modules, read from their source (ast):
imports inside functions and under `if TYPE_CHECKING:` count, as a module
that needs another's names only for its types still cannot be read, checked
or changed without it. A circle is a group of modules each of which reaches
the others (a strongly connected component of the import graph).

`from package import name` depends on the submodule package.name when there
is one, else on the package's __init__; the package a module lies in is not
counted (Python runs it first, whoever imports what)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "lmqa"


def module_name(path: Path, root: Path = ROOT) -> str:
    """lmqa/qa/session.py -> lmqa.qa.session; lmqa/qa/__init__.py -> lmqa.qa."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(module: str, is_package: bool, source: str, modules: set[str]) -> set[str]:
    """The modules of `modules` that one module's source imports, wherever the import stands."""
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module or ""])
                base = base.rstrip(".")
            else:
                base = node.module or ""
            out.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return (out & modules) - {module}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    return {m: imported(m, p.name == "__init__.py", p.read_text(), set(files)) for m, p in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of two or more modules that import each other, directly or
    through others (Tarjan's strongly connected components), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_reader_resolves_imports_of_every_form(tmp_path):
    pkg = tmp_path / "lmqa"
    for name in ("__init__", "a", "b", "c", "d", "e", "f", "sub/__init__", "sub/g", "sub/h"):
        (pkg / f"{name}.py").parent.mkdir(parents=True, exist_ok=True)
        (pkg / f"{name}.py").write_text("")
    (pkg / "sub" / "h.py").write_text("""
from __future__ import annotations
from typing import TYPE_CHECKING
import lmqa.a
from . import g
from .. import b
from ..c import x
from lmqa.sub import NAME
from lmqa import __version__
import os
if TYPE_CHECKING:
    from lmqa.d import D
def later():
    from ..e import E
""")
    (pkg / "sub" / "__init__.py").write_text("from .g import G\nfrom ..f import F\n")
    graph = import_graph(pkg)
    assert graph["lmqa.sub.h"] == {"lmqa.a", "lmqa.sub.g", "lmqa.b", "lmqa.c", "lmqa.sub", "lmqa", "lmqa.d", "lmqa.e"}
    assert graph["lmqa.sub"] == {"lmqa.sub.g", "lmqa.f"}


@pytest.mark.parametrize("graph, found", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}}, [["a", "b"], ["c", "d"]]),
])
def test_circles(graph, found):
    assert sorted(circles(graph)) == found


def test_no_import_circle_among_lmqa_modules():
    graph = import_graph()
    assert {"lmqa.cli", "lmqa.serve.command", "lmqa.qa.session", "lmqa.model.loading"} <= set(graph)
    assert circles(graph) == []
