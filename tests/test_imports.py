"""Imports run one way: every module of the package imports alone, and the import graph has no cycle.

A cycle that Python tolerates (closed by an import inside a function, or by one module importing the
package `__init__`) still means two modules that cannot be understood or changed apart, and it breaks
as soon as someone moves the import to the top. So the graph below counts every import of a package
module: at module level, inside functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

import precompile
from precompile.cli import main
from precompile.version import __version__

PACKAGE = ROOT / "precompile"
# The two modules that sit above every other: `__init__` re-exports the API from all over the package
# (lazily, by name), and `__main__` runs the program when imported, so it is not imported alone below.
TOP = ("__init__", "__main__")


def modules(package: Path) -> list[str]:
    return sorted(p.stem for p in package.glob("*.py"))


def import_graph(package: Path, name: str = "precompile") -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of the first such import}, from every import statement
    anywhere in the module: `from .x import y`, `from . import x`, `from precompile.x import y`,
    `import precompile.x`. Importing the package itself (`from . import __version__`) is an edge to
    `__init__`, which in turn reaches every module."""
    mods = set(modules(package))
    graph: dict[str, dict[str, int]] = {}
    for mod in sorted(mods):
        edges: dict[str, int] = {}
        for target, line in _imported(package / f"{mod}.py", mods, name):
            if target != mod:
                edges.setdefault(target, line)
        graph[mod] = edges
    if "__init__" in graph:
        for mod in mods - set(TOP):
            graph["__init__"].setdefault(mod, 0)
    return graph


def _imported(path: Path, mods: set[str], name: str):
    """(package module, line) for each import of one in the file, in the order ast walks them."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                dotted = node.module
            elif node.level == 0 and (node.module == name or (node.module or "").startswith(name + ".")):
                dotted = node.module[len(name) + 1:] or None
            else:
                continue
            if dotted:
                yield dotted.split(".")[0], node.lineno
            else:  # from . import x, y: submodules, or names of the package __init__
                for alias in node.names:
                    yield (alias.name if alias.name in mods else "__init__"), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == name:
                    yield "__init__", node.lineno
                elif alias.name.startswith(name + "."):
                    yield alias.name.split(".")[1], node.lineno


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan), as [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:  # the shortest way back to the group's first module, by breadth-first search
        start = min(group)
        paths = {start: [start]}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in graph[v]:
                found.append(paths[v] + [start])
                break
            for w in sorted(graph[v]):
                if w in group and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return found


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """`a (line 3) -> b (line 9) -> a`: each module with the line of its import of the next; then every module
    on some cycle with this one, when there are more."""
    path = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
    group = {v for v in graph if cycle[0] in _reach(graph, v) and v in _reach(graph, cycle[0])}
    return path + (f"; also tangled in it: {', '.join(sorted(group - set(cycle)))}" if group - set(cycle) else "")


def _reach(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for w in graph.get(todo.pop(), {}):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_import_graph_has_no_cycle():
    graph = import_graph(PACKAGE)
    assert set(graph) >= {"files", "errors", "convert", "cli", "__init__"}  # the parse found the package
    found = cycles(graph)
    assert not found, "import cycles among precompile's modules:\n" + "\n".join(describe(c, graph) for c in found)


def test_files_is_the_bottom_of_the_graph():
    """File safety is imported by everything that reads or writes, so it imports nothing of the package
    but `errors` (which imports nothing at all)."""
    graph = import_graph(PACKAGE)
    assert set(graph["files"]) <= {"errors"}
    assert graph["errors"] == {} and graph["version"] == {}


def test_the_cycle_check_finds_each_kind_of_cycle(tmp_path):
    """The checker itself: a cycle closed inside a function, under TYPE_CHECKING, or through the package
    __init__ is found and printed with its lines; a one-way graph passes."""
    pkg = tmp_path / "precompile"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "errors.py").write_text("")
    (pkg / "a.py").write_text("from .errors import E\nfrom precompile.b import f\n")
    (pkg / "b.py").write_text("import os\n\n\ndef f():\n    import precompile.c\n")
    (pkg / "c.py").write_text("from . import errors\n")
    assert cycles(import_graph(pkg)) == []
    (pkg / "c.py").write_text("from . import errors\n\n\ndef g():\n    from .a import x\n")
    found = cycles(import_graph(pkg))
    assert found == [["a", "b", "c", "a"]]
    assert describe(found[0], import_graph(pkg)) == "a (line 2) -> b (line 5) -> c (line 5) -> a"
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import f\n")
    assert cycles(import_graph(pkg)) == [["b", "c", "b"]]
    (pkg / "c.py").write_text("from . import __version__\n")
    assert cycles(import_graph(pkg)) == [["__init__", "c", "__init__"]]


def _import_alone(module: str) -> tuple[str, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return module, subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                                  env=env, cwd=ROOT, timeout=300)


def test_each_module_imports_alone_in_a_fresh_interpreter():
    """Every module is importable first, before any other of the package: no module relies on another
    having been imported already (which an import cycle hides until the order changes)."""
    names = ["precompile"] + [f"precompile.{m}" for m in modules(PACKAGE) if m not in TOP]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(_import_alone, names))
    failed = [f"{m}:\n{r.stderr.strip()[-2000:]}" for m, r in results if r.returncode != 0]
    assert not failed, "\n\n".join(failed)
    assert len(results) > 20


def test_the_version_has_one_home():
    """pyproject takes the version from precompile/version.py, the package re-exports it, the CLI prints it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "precompile.version.__version__"}
    assert precompile.__version__ == __version__
    out = CliRunner().invoke(main, ["--version"])
    assert out.exit_code == 0 and __version__ in out.output
