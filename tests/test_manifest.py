"""precompile.json has one reader and writer (loader.Manifest) and one way to find the original model
(loader.locate_source); each shared table has one owner, and the copies the standalone loader keeps agree."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

import tiny
from precompile import loader
from precompile.convert import convert
from precompile.io.file_safety import write_json
from precompile.io.safetensors_files import DTYPE_NAMES, TORCH_DTYPES
from precompile.loader import MANIFEST, Manifest, PrecompileLoadError, SourceNotFoundError, locate_source, read_manifest

PKG = Path(loader.__file__).parent
REPO, REV = "org/tiny-llama", "c" * 40


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    """(source, full OUT_DIR, overlay OUT_DIR) of one local tiny llama."""
    src = checkpoint("llama")
    d = tmp_path_factory.mktemp("manifest")
    convert(str(src), d / "full", device="cpu")
    convert(str(src), d / "overlay", device="cpu", overlay=True)
    return src, d / "full", d / "overlay"


# --- one reader and writer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["full", "overlay"])
def test_round_trip_gives_the_same_manifest_and_bytes(converted, kind, tmp_path):
    out = converted[1] if kind == "full" else converted[2]
    raw = (out / MANIFEST).read_bytes()
    m = Manifest.read(out)
    assert m.kind == kind and m.table.dtype == "float32" and m.eliminated
    assert Manifest.from_dict(m.to_dict()) == m
    assert Manifest.from_dict(json.loads(raw)) == m
    write_json(tmp_path / MANIFEST, m.to_dict())  # as the converter writes it
    assert (tmp_path / MANIFEST).read_bytes() == raw
    assert read_manifest(out) == json.loads(raw)  # the dict view of the public API is the file's JSON
    # an overlay pins its base by sizes (and, for a local source, mtimes); a full conversion does not
    assert (m.source.sizes is not None, m.source.mtimes is not None) == (kind == "overlay",) * 2


def test_guard_is_written_only_when_set(converted):
    m = Manifest.read(converted[1])
    assert m.table.guard and m.to_dict()["table"]["guard"] == m.table.guard
    older = replace(m, table=replace(m.table, guard=None))  # made before the table file held a guard
    assert "guard" not in older.to_dict()["table"] and Manifest.from_dict(older.to_dict()) == older
    d = m.to_dict()
    d["table"]["guard"] = 3
    with pytest.raises(PrecompileLoadError, match="table.guard must be a tensor name"):
        Manifest.from_dict(d)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="other"), "is not a precompile manifest"),
    (lambda d: d.update(format_version=99), "has format version 99"),
    (lambda d: d.pop("loader"), "has no 'loader' section"),
    (lambda d: d["table"].update(dtype="int8"), "table.dtype must be one of float32, bfloat16, float16, float64"),
    (lambda d: d.update(output_sizes={"a": "big"}), "output_sizes, source.sizes and source.mtimes must map"),
    (lambda d: d["source"].update(sizes=[1]), "output_sizes, source.sizes and source.mtimes must map"),
])
def test_checks_name_the_problem(converted, change, message):
    d = json.loads((converted[1] / MANIFEST).read_text())
    change(d)
    with pytest.raises(PrecompileLoadError, match=re.escape(message)):
        Manifest.from_dict(d, "x/precompile.json")


def test_older_manifest_without_optional_fields_reads(converted):
    d = json.loads((converted[1] / MANIFEST).read_text())
    for key in ("profile", "options", "output_sizes", "kind", "tool_version"):
        d.pop(key)
    m = Manifest.from_dict(d)
    assert (m.kind, m.profile.name, m.options, m.output_sizes) == ("full", None, {}, None)


# --- locate_source -----------------------------------------------------------------------------------------------

def test_locate_explicit_base(converted, tmp_path):
    m = Manifest.read(converted[1])
    assert locate_source(m, base=tmp_path) == tmp_path.resolve()  # over the recorded path
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrecompileLoadError, match="is not a directory"):
        locate_source(m, base=tmp_path / "file")


def test_locate_recorded_local_path(converted, tmp_path):
    src, full, _ = converted
    m = Manifest.read(full)
    assert m.source.path == str(src.resolve()) and locate_source(m) == src.resolve()
    gone = replace(m, source=replace(m.source, path=str(tmp_path / "gone")))
    with pytest.raises(SourceNotFoundError, match="is gone"):
        locate_source(gone)
    with pytest.raises(SourceNotFoundError, match="records no source"):
        locate_source(replace(m, source=replace(m.source, path=None)))


def test_locate_hub_source_through_the_given_fetcher(converted, tmp_path):
    m = Manifest.read(converted[1])
    m = replace(m, source=replace(m.source, path=None, id=REPO, revision=REV))
    calls = []
    assert locate_source(m, hub=lambda repo, rev: calls.append((repo, rev)) or tmp_path) == tmp_path
    assert calls == [(REPO, REV)]


def test_locate_hub_source_from_the_cache_at_the_recorded_revision(converted, tmp_path, hub):
    src, _, overlay = converted
    snap = tiny.lay_out_hub_cache(tmp_path / "hf", REPO, src, REV)
    tiny.lay_out_hub_cache(tmp_path / "hf", REPO, src, "d" * 40)  # refs/main now names another revision
    m = Manifest.read(overlay)
    m = replace(m, source=replace(m.source, path=None, id=REPO, revision=REV))
    assert locate_source(m) == snap


# --- one owner per table; marked copies agree ---------------------------------------------------------------------

COPIED = re.compile(r"#\s*Copied from precompile\.([\w.]+)\.(\w+)(?: with (.*)|(,.*))?")


def _copies() -> list[tuple[str, str, str, str, list[tuple[str, str]]]]:
    """(module, name, owner module, owner name, renames) for every `# Copied from` mark in the package; renames
    None for a copy marked as partial (`# Copied from X, less ...`), whose owner need only exist."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            mark = COPIED.search(line)
            if not mark:
                continue
            code = line[:mark.start()].strip() or lines[i + 1]  # the copy: this line's code, else the next line
            name = re.match(r"(?:def\s+)?(\w+)", code.strip()).group(1)
            renames = [tuple(r.split("->")) for r in (mark[3] or "").split(", ") if r]
            module = ".".join(path.relative_to(PKG).with_suffix("").parts)
            found.append((module, name, mark[1], mark[2], None if mark[4] else renames))
    return found


def test_copies_are_marked():
    marked = {(m, n) for m, n, *_ in _copies()}
    assert {("loader", "INDEX"), ("loader", "SINGLE"), ("loader", "_DTYPES"), ("loader", "_weight_index"),
            ("plan.trade", "MANIFEST")} <= marked


@pytest.mark.parametrize("copy", _copies(), ids=lambda c: f"{c[0]}.{c[1]}")
def test_copy_agrees_with_its_owner(copy):
    module, name, owner_module, owner_name, renames = copy
    mine = getattr(importlib.import_module(f"precompile.{module}"), name)
    owner = getattr(importlib.import_module(f"precompile.{owner_module}"), owner_name)
    if renames is None:
        assert inspect.isfunction(mine) and inspect.isfunction(owner)
    elif inspect.isfunction(owner):
        want = inspect.getsource(owner).replace(f"def {owner_name}(", f"def {name}(")
        for old, new in renames:
            want = want.replace(old, new)
        assert inspect.getsource(mine) == want
    else:
        assert mine == owner


def test_loader_safetensors_codes_agree():
    assert loader._CODES == {n: DTYPE_NAMES[t] for n, t in TORCH_DTYPES.items()}


OWNERS = [
    (r"removeprefix\(\s*[\"']torch\.[\"']\s*\)", {"tensors.py"}),  # a dtype's name: tensors.dtype_name
    (r"[\"'](?:float32|bfloat16|float16|float64)[\"']\s*:\s*torch\.", {"tensors.py", "loader.py"}),  # by name
    (r"[\"'](?:F32|BF16|F16|F64)[\"']\s*:\s*torch\.", {"tensors.py"}),  # by safetensors code
    (r"\bmanifest\s*\[|\bmanifest\.get\(|\.get\([\"']source[\"']\)", set()),  # the manifest as a raw dict
    (r"(?:json\.loads?|read_json|_read_json_file)\([^)]*(?:MANIFEST|precompile\.json)", set()),  # read raw
    (r"def layer0_tensor_names|\[\s*spec\.embedding_tensor\s*\]\s*\+", {"layout.py"}),  # the layer-0 list
    (r"\.exists\(\)\s+and\s+not\s+\([^)]*SINGLE", {"weight_files.py", "loader.py"}),  # index-or-single rule
    (r"in FLOAT_DTYPES else", {"tensors.py"}),  # the output-dtype rule: tensors.output_dtype
]


@pytest.mark.parametrize("pattern, owners", OWNERS, ids=[p for p, _ in OWNERS])
def test_each_rule_has_one_owner(pattern, owners):
    where = sorted(p.name for p in PKG.glob("*.py") if re.search(pattern, p.read_text(encoding="utf-8")))
    assert set(where) <= owners, f"{pattern} outside its owner: {where}"
