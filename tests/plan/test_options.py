"""Conversion options are defined once (precompile/options.py): the CLI flags, the zoo keys, the manifest's
`options`, batch's skip rule and the library's keywords all follow ConvertOptions, so an option added in one
place only fails here."""

from __future__ import annotations

import inspect
import json
import re
import shutil

import pytest
import yaml

from conftest import ROOT, run_cli_here, to_pickle
from precompile import ConvertOptions, UserError, convert, plan_conversion
from precompile.batch import stale_reason
from precompile.cli import main
from precompile.plan.convert_options import cli_flag, meta, option_fields, zoo_table
from precompile.zoo_file import OPTION_CHECKS, Entry, load_zoo

FIELDS = [f.name for f in option_fields()]
CONVERT_CLI_ONLY = {"source", "out_dir", "force", "dry_run", "push_to", "quiet"}  # not how to convert: what to do
BATCH_ONLY = {"prompts", "verify", "push_to"}  # what batch does after converting


@pytest.fixture
def cli():
    """In this process: these tests are about batch's report of a pickle-only entry, not the process."""
    return run_cli_here


def _params(command: str) -> dict:
    return {p.name: p for p in main.commands[command].params}


def test_every_option_is_a_convert_flag_and_nothing_else_is():
    params = _params("convert")
    assert set(params) == set(FIELDS) | CONVERT_CLI_ONLY
    for f in option_fields():
        p, m = params[f.name], meta(f)
        assert p.opts == [cli_flag(f)] and p.help == m.help, f.name  # defaults: test_flags_parse_into_options
        assert list(getattr(p.type, "choices", m.choices)) == list(m.choices), f.name


def test_flags_parse_into_options():
    ctx = main.commands["convert"].make_context("convert", ["src", "out"])
    given = {k: v for k, v in ctx.params.items() if k in FIELDS}
    assert ConvertOptions(**given) == ConvertOptions()
    args = ["src", "out", "--no-self-check", "--allow-pickle", "--chunk-size", "7", "--dtype", "bfloat16",
            "--profile", "p.yaml", "--link", "copy"]
    ctx = main.commands["convert"].make_context("convert", args)
    opts = ConvertOptions(**{k: v for k, v in ctx.params.items() if k in FIELDS})
    assert opts == ConvertOptions(self_check=False, allow_pickle=True, chunk_size=7, dtype="bfloat16",
                                  profile="p.yaml", link="copy")


def test_materialize_flags_are_the_same_options():
    params, convert_params = _params("materialize"), _params("convert")
    for name in ("profile", "link", "self_check"):
        p, q = params[name], convert_params[name]
        assert (p.opts, p.default, p.flag_value, getattr(p.type, "choices", None)) == \
            (q.opts, q.default, q.flag_value, getattr(q.type, "choices", None))


def test_every_option_is_a_zoo_key_and_nothing_else_is():
    assert set(OPTION_CHECKS) == set(FIELDS) | BATCH_ONLY
    assert list(OPTION_CHECKS)[:len(FIELDS)] == FIELDS
    for f in option_fields():
        _, ok = OPTION_CHECKS[f.name]
        assert f.default is None or ok(f.default), f.name
        assert not ok(["a list"]) and not ok(-1), f.name
    assert OPTION_CHECKS["chunk_size"][0] == "a positive integer" and not OPTION_CHECKS["chunk_size"][1](True)


@pytest.mark.parametrize("key, value, expect", [
    ("allow_pickle", "yes", "models[0].allow_pickle must be true or false, got 'yes'"),
    ("link", "symlink", "models[0].link must be one of auto, reflink, hardlink, copy, got 'symlink'"),
    ("compute_dtype", "float16", "models[0].compute_dtype must be one of float32, float64, got 'float16'"),
    ("chunk_size", 0, "models[0].chunk_size must be a positive integer, got 0"),
    ("force", True, "models[0] has unknown field 'force'; known fields: source, out, revision, profile, device, "
                    "dtype, compute_dtype, chunk_size, link, overlay, allow_pickle, self_check, prompts, verify, "
                    "push_to"),
])
def test_zoo_values_are_checked_from_the_options(tmp_path, key, value, expect):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"models": [{"source": "x", key: value}]}))
    with pytest.raises(UserError) as e:
        load_zoo(zoo)
    assert str(e.value) == f"zoo file {zoo}: {expect}"


def test_zoo_options_become_convert_options(tmp_path):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"defaults": {"allow_pickle": True, "chunk_size": 7},
                                   "models": [{"source": "x", "profile": "p.yaml", "verify": True}]}))
    (entry,) = load_zoo(zoo)
    assert entry.convert_options == ConvertOptions(allow_pickle=True, chunk_size=7,
                                                   profile=str((tmp_path / "p.yaml").resolve()))


def test_library_keywords_are_the_options():
    params = inspect.signature(convert).parameters
    assert set(params) == {"source", "out_dir", "options", "force", "progress", "table", "kwargs"}
    planned = {n for n, p in inspect.signature(plan_conversion).parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert planned - {"scratch"} == {f.name for f in option_fields() if meta(f).compared}
    for name in planned - {"scratch"}:  # plan_conversion's own defaults are the options' defaults
        assert inspect.signature(plan_conversion).parameters[name].default == \
            next(f.default for f in option_fields() if f.name == name)
    with pytest.raises(TypeError, match="chunksize"):
        convert("src", "out", chunksize=7)
    with pytest.raises(UserError, match=r"^--chunk-size must be at least 1, got 0$"):
        convert("src", "out", chunk_size=0)
    with pytest.raises(UserError, match=r"^--device tpu is not one of auto, cpu, cuda$"):
        convert("src", "out", ConvertOptions(), device="tpu")
    assert ConvertOptions.build(ConvertOptions(chunk_size=7), dtype="float16") == \
        ConvertOptions(chunk_size=7, dtype="float16")


def test_manifest_options_and_skip_rule_follow_the_declarations(checkpoint, tmp_path):
    """The manifest records the `recorded` options; batch converts again only for a `compared` one."""
    src = checkpoint("llama")
    out = tmp_path / "out"
    convert(str(src), out, ConvertOptions(chunk_size=64, device="cpu", self_check=False))
    recorded = json.loads((out / "precompile.json").read_text())["options"]
    assert recorded == {"dtype": "float32", "compute_dtype": "float32"}
    assert set(recorded) == {f.name for f in option_fields() if meta(f).recorded}
    assert stale_reason(Entry(0, str(src), "out", {}), out) is None
    not_compared = {"chunk_size": 7, "device": "cpu", "link": "copy", "self_check": True}
    assert set(not_compared) == {f.name for f in option_fields() if not meta(f).compared}
    assert stale_reason(Entry(0, str(src), "out", not_compared), out) is None
    assert stale_reason(Entry(0, str(src), "out", {"dtype": "bfloat16"}), out) == "other options"
    assert stale_reason(Entry(0, str(src), "out", {"compute_dtype": "float64"}), out) == "other options"
    assert stale_reason(Entry(0, str(src), "out", {"overlay": True}), out) == "another kind or profile"


def test_zoo_entry_with_allow_pickle_converts_a_pickle_checkpoint(checkpoint, tmp_path, cli):
    src = tmp_path / "pickled"
    shutil.copytree(checkpoint("llama"), src)
    to_pickle(src)
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"defaults": {"device": "cpu", "self_check": False},
                                   "models": [{"source": "pickled", "out": "refused"},
                                              {"source": "pickled", "out": "ok", "allow_pickle": True}]}))
    r = cli("batch", zoo, "--out-root", tmp_path / "out", "--report", tmp_path / "r.json")
    entries = {e["out"]: e for e in json.loads((tmp_path / "r.json").read_text())["entries"]}
    assert r.returncode == 1 and entries["ok"]["status"] == "ok", r.stderr
    assert entries["refused"]["status"] == "failed" and "--allow-pickle" in entries["refused"]["error"]
    manifest = json.loads((tmp_path / "out" / "ok" / "precompile.json").read_text())
    assert manifest["options"]["pickle"] == "loaded with torch.load(weights_only=True)"
    assert "pytorch_model.bin" in manifest["source"]["files"]
    r = cli("batch", zoo, "--out-root", tmp_path / "out", "--report", tmp_path / "r.json")
    entries = {e["out"]: e["status"] for e in json.loads((tmp_path / "r.json").read_text())["entries"]}
    assert entries == {"refused": "failed", "ok": "skipped"}, r.stderr


def test_docs_show_every_option():
    """docs/batch.md holds the zoo table generated from ConvertOptions; README's convert table names every flag."""
    batch_md = (ROOT / "docs" / "batch.md").read_text()
    table = re.search(r"<!-- options table.*?-->\n(.*?)\n<!-- end of options table -->", batch_md, re.DOTALL)
    assert table and table.group(1) == zoo_table(), f"docs/batch.md: replace the options table with\n{zoo_table()}"
    readme = (ROOT / "README.md").read_text()
    convert_table = readme[readme.index("precompile convert SOURCE OUT_DIR [options]"):readme.index("Global options")]
    flags = set(re.findall(r"^\| `(--[\w-]+)", convert_table, re.MULTILINE))
    assert {cli_flag(f) for f in option_fields()} <= flags
