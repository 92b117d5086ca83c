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
# The pipeline's stages, lowest first: a module imports only modules of its own stage or of stages below it.
# The foundation is the top-level modules that import nothing of the package; every other top-level module
# (the commands: convert, materialize, batch, cli, __main__, __init__) is the top stage; a sub-package is a stage.
FOUNDATION = ("version", "errors", "loader")
STAGES = ("foundation", "io", "profiles", "plan", "compute", "check", "publish", "top")


def modules(package: Path) -> list[str]:
    """Dotted module names below the package: `convert`, `io.source`; a sub-package's `__init__` is named after
    the sub-package (`io`), the package's own is `__init__`."""
    names = []
    for p in package.rglob("*.py"):
        parts = p.relative_to(package).with_suffix("").parts
        if len(parts) > 1 and parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return sorted(names)


def stage(module: str) -> str:
    """The stage a module belongs to (see STAGES)."""
    if "." in module or module in STAGES:
        return module.split(".")[0]
    return "foundation" if module in FOUNDATION else "top"


def import_graph(package: Path, name: str = "precompile") -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of the first such import}, from every import statement
    anywhere in the module: `from .x import y`, `from . import x`, `from precompile.x.y import z`,
    `from precompile.x import y`, `import precompile.x.y`. Importing the package itself (`from . import
    __version__`) is an edge to `__init__`, which in turn reaches every module."""
    mods = set(modules(package))
    graph: dict[str, dict[str, int]] = {}
    for mod in sorted(mods):
        edges: dict[str, int] = {}
        for target, line in _imported(package, mod, mods, name):
            if target != mod:
                edges.setdefault(target, line)
        graph[mod] = edges
    if "__init__" in graph:
        for mod in mods - set(TOP):
            graph["__init__"].setdefault(mod, 0)
    return graph


def _path(package: Path, mod: str) -> Path:
    rel = Path(*mod.split("."))
    return package / rel / "__init__.py" if (package / rel).is_dir() else package / rel.with_suffix(".py")


def _resolve(dotted: str, mods: set[str]) -> str:
    """The module a dotted name (relative to the package) imports: the longest prefix that is a module."""
    parts = dotted.split(".") if dotted else []
    while parts and ".".join(parts) not in mods:
        parts.pop()
    return ".".join(parts) or "__init__"


def _imported(package: Path, mod: str, mods: set[str], name: str):
    """(package module, line) for each import of one in the module, in the order ast walks them."""
    path = _path(package, mod)
    here = mod.split(".") if path.name == "__init__.py" and mod != "__init__" else mod.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                dotted = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module == name or (node.module or "").startswith(name + "."):
                dotted = node.module[len(name) + 1:]
            else:
                continue
            if dotted == "" or (package / Path(*dotted.split("."))).is_dir():
                for alias in node.names:  # from <package> import x, y: submodules, or names of its __init__
                    sub = f"{dotted}.{alias.name}" if dotted else alias.name
                    yield (sub if sub in mods else dotted or "__init__"), node.lineno
            else:
                yield _resolve(dotted, mods), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == name or alias.name.startswith(name + "."):
                    yield _resolve(alias.name[len(name) + 1:], mods), node.lineno


def layering(graph: dict[str, dict[str, int]]) -> list[str]:
    """One line per import of a higher stage by a lower one: `io.source (line 12) imports check.verify: io is
    below check`. Imports within a stage are allowed (the cycle check covers them)."""
    rank = {s: i for i, s in enumerate(STAGES)}
    return [f"{a} (line {line}) imports {b}: {stage(a)} is below {stage(b)}"
            for a, edges in sorted(graph.items()) for b, line in sorted(edges.items())
            if rank[stage(a)] < rank[stage(b)]]


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
    # the parse found the package, down into every stage's sub-package
    assert set(graph) >= {"errors", "convert", "cli", "__init__"} and {stage(m) for m in graph} == set(STAGES)
    found = cycles(graph)
    assert not found, "import cycles among precompile's modules:\n" + "\n".join(describe(c, graph) for c in found)


# What file safety defines: checks of what a path is, JSON read and written safely, hashes, OUT_DIR's scratch and
# lock names, write errors. The io modules that define any of these are "file safety", wherever io keeps them.
FILE_SAFETY_NAMES = {"check_regular", "check_inside", "read_json", "write_json", "remove_tree", "write_error",
                     "file_sha256", "blob_sha256", "TMP_PREFIX", "LOCK_PREFIX"}


def _defines(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return names | {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def test_file_safety_is_the_bottom_of_the_graph():
    """File safety is imported by everything that reads or writes, so it imports nothing of the package but
    `errors` (which imports nothing at all) and io modules that themselves import at most `errors`."""
    graph = import_graph(PACKAGE)
    safety = sorted(m for m in graph if stage(m) == "io" and _defines(_path(PACKAGE, m)) & FILE_SAFETY_NAMES)
    assert safety, f"no io module defines any of {sorted(FILE_SAFETY_NAMES)}"
    for mod in safety:
        leaves = {m for m in graph[mod] if stage(m) == "io" and set(graph[m]) <= {"errors"}}
        assert set(graph[mod]) <= {"errors"} | leaves, (mod, graph[mod])
    assert graph["errors"] == {} and graph["version"] == {}


def test_the_foundation_imports_nothing_of_the_package():
    """version, errors and the self-contained loader (copied into every OUT_DIR) import no module of the package."""
    graph = import_graph(PACKAGE)
    assert {m: graph[m] for m in FOUNDATION} == {m: {} for m in FOUNDATION}


def test_no_stage_imports_a_stage_above_it():
    """foundation < io < profiles < plan < compute < check < publish < top: an import from a lower stage into a
    higher one (at module level, in a function, or under TYPE_CHECKING) is an upward edge. Within a stage, modules
    may import each other (without cycles: test_the_import_graph_has_no_cycle)."""
    graph = import_graph(PACKAGE)
    assert {stage(m) for m in graph} == set(STAGES), sorted({stage(m) for m in graph})
    upward = layering(graph)
    assert not upward, "imports of a higher stage:\n" + "\n".join(upward)


def test_the_layering_check_finds_each_upward_import(tmp_path):
    """The checker itself, on a synthetic package: a one-way package passes; an upward import at module level,
    inside a function, under TYPE_CHECKING, relative, or from the foundation is reported, one line each."""
    pkg = tmp_path / "precompile"
    for sub in ("io", "check"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text('"""A stage."""\n')
    (pkg / "__init__.py").write_text("from precompile.version import __version__\n")
    (pkg / "version.py").write_text("__version__ = '1'\n")
    (pkg / "errors.py").write_text("")
    (pkg / "io" / "files.py").write_text("from precompile.errors import E\n")
    (pkg / "io" / "source.py").write_text("from precompile.io.files import f\nfrom . import files\n")
    (pkg / "check" / "verify.py").write_text("from precompile.io import source\nfrom ..errors import E\n")
    (pkg / "convert.py").write_text("import precompile.check.verify\nfrom precompile import errors\n")
    graph = import_graph(pkg)
    assert graph["check.verify"] == {"io.source": 1, "errors": 2}
    assert graph["convert"] == {"check.verify": 1, "errors": 2}
    assert layering(graph) == [] and cycles(graph) == []
    (pkg / "io" / "source.py").write_text("from precompile.io.files import f\n\n\ndef g():\n"
                                          "    from precompile.check.verify import v\n")
    assert layering(import_graph(pkg)) == ["io.source (line 5) imports check.verify: io is below check"]
    (pkg / "io" / "source.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from ..check import verify\n")
    assert layering(import_graph(pkg)) == ["io.source (line 3) imports check.verify: io is below check"]
    (pkg / "io" / "source.py").write_text("import precompile.convert\n")
    (pkg / "errors.py").write_text("from precompile.io import files\n")
    assert layering(import_graph(pkg)) == ["errors (line 1) imports io.files: foundation is below io",
                                           "io.source (line 1) imports convert: io is below top"]


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
    names = ["precompile"] + [f"precompile.{m}" for m in modules(PACKAGE)
                              if m not in TOP and not m.endswith(".__main__")]  # `python -m` entry points run
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
