"""`precompile batch`: isolation, skipping, reports, shards and determinism on a zoo of tiny models."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from conftest import run_cli_here, tree_snapshot


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, checkpoint):
    """Four entries: three families that convert, and one unsupported architecture."""
    root = tmp_path_factory.mktemp("zoo")
    for fam in ("llama", "qwen2", "gemma"):
        shutil.copytree(checkpoint(fam), root / fam)
    broken = root / "broken"
    shutil.copytree(checkpoint("llama"), broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(architectures=["FooForCausalLM"], model_type="foo")
    (broken / "config.json").write_text(json.dumps(cfg))
    (root / "prompts.txt").write_text("the quick brown fox\nhello world\n")
    zoo = {"defaults": {"chunk_size": 64},
           "models": [{"source": "llama", "prompts": "prompts.txt"}, {"source": "qwen2"},
                      {"source": "broken"}, {"source": "gemma", "out": "gemma-bf16", "dtype": "bfloat16"}]}
    path = root / "zoo.yaml"
    path.write_text(yaml.safe_dump(zoo))
    return path


@pytest.fixture
def cli():
    """batch in this process: these tests are about its results, reports and exit codes, not its process."""
    return run_cli_here


def _outputs(root: Path) -> dict[str, bytes]:
    return {k: v[2] for k, v in tree_snapshot(root).items() if not k.endswith((".json.report", ".xml"))}


def test_isolation_reports_and_skip(zoo, tmp_path, cli):
    out = tmp_path / "out"
    r = cli("batch", zoo, "--out-root", out, "--report", tmp_path / "r.json", "--junit", tmp_path / "j.xml")
    assert r.returncode == 1, r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["summary"] == {"ok": 3, "skipped": 0, "failed": 1}
    by_out = {e["out"]: e for e in report["entries"]}
    assert by_out["broken"]["status"] == "failed" and "FooForCausalLM" in by_out["broken"]["error"]
    assert by_out["gemma-bf16"]["status"] == "ok" and by_out["gemma-bf16"]["bytes"] > 0
    assert by_out["llama"]["plan"]["eliminated_weights"] > 0
    suite = ET.parse(tmp_path / "j.xml").getroot()
    assert suite.get("tests") == "4" and suite.get("failures") == "1"
    failures = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert len(failures) == 1 and "FooForCausalLM" in failures[0].find("failure").get("message")
    assert "3 ok, 0 skipped, 1 failed" in r.stdout
    assert not (out / "broken").exists()

    before = tree_snapshot(out)
    r = cli("batch", zoo, "--out-root", out, "--report", tmp_path / "r2.json")
    assert r.returncode == 1
    report = json.loads((tmp_path / "r2.json").read_text())
    assert report["summary"] == {"ok": 0, "skipped": 3, "failed": 1}
    assert tree_snapshot(out) == before  # same bytes and mtimes: nothing rewritten


def test_option_change_is_not_up_to_date(zoo, tmp_path, cli):
    out = tmp_path / "out"
    assert cli("batch", zoo, "--out-root", out).returncode == 1
    data = yaml.safe_load(zoo.read_text())
    data["models"][1]["dtype"] = "bfloat16"
    changed = zoo.parent / "zoo-changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    r = cli("batch", changed, "--out-root", out, "--report", tmp_path / "r.json")
    entries = {e["out"]: e["status"] for e in json.loads((tmp_path / "r.json").read_text())["entries"]}
    assert entries == {"llama": "skipped", "qwen2": "ok", "broken": "failed", "gemma-bf16": "skipped"}, r.stderr


def test_two_clean_runs_are_byte_identical(zoo, tmp_path, cli):
    cli("batch", zoo, "--out-root", tmp_path / "a", "--jobs", "2")
    cli("batch", zoo, "--out-root", tmp_path / "b")
    a, b = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    assert a and a == b


def test_shards_cover_each_entry_once(zoo, tmp_path, cli):
    out = tmp_path / "out"
    reports = []
    for i in (1, 2):
        cli("batch", zoo, "--out-root", out, "--shard", f"{i}/2", "--report", tmp_path / f"r{i}.json")
        reports.append(json.loads((tmp_path / f"r{i}.json").read_text()))
    outs = [e["out"] for rep in reports for e in rep["entries"]]
    assert sorted(outs) == sorted(["llama", "qwen2", "broken", "gemma-bf16"])
    assert all(e["status"] != "skipped" for rep in reports for e in rep["entries"])


def test_dry_run_writes_nothing(zoo, tmp_path, cli):
    out = tmp_path / "out"
    r = cli("batch", zoo, "--out-root", out, "--dry-run")
    assert r.returncode == 0, r.stderr
    actions = [line.rsplit(": ", 1)[-1] for line in r.stdout.splitlines()]
    assert actions.count("convert") == 3 and "FooForCausalLM" in r.stdout
    assert not out.exists()


@pytest.mark.parametrize("models, expect", [
    ([{"source": "x", "dtpye": "bfloat16"}], "models[0] has unknown field 'dtpye'"),
    ([{"source": "x"}, {"revision": "main"}], "models[1] is missing field 'source'"),
    ([{"source": "x", "dtype": "int4"}], "models[0].dtype must be one of"),
    ([{"source": "a/x"}, {"source": "b/x", "out": "a--x"}], "models[1] writes to 'a--x'"),
])
def test_schema_errors_name_index_and_field(tmp_path, cli, models, expect):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"models": models}))
    r = cli("batch", zoo, "--out-root", tmp_path / "out")
    assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_shard_is_bad_input(zoo, tmp_path, cli):
    r = cli("batch", zoo, "--out-root", tmp_path / "out", "--shard", "3/2")
    assert r.returncode == 2 and "--shard 3/2" in r.stderr


def test_overlay_entries_with_verify(checkpoint, tmp_path, cli):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"defaults": {"overlay": True}, "models": [{"source": str(checkpoint("qwen2"))}]}))
    out = tmp_path / "out"
    r = cli("batch", zoo, "--out-root", out, "--report", tmp_path / "r.json", "--verify")
    assert r.returncode == 0, r.stderr
    (entry,) = json.loads((tmp_path / "r.json").read_text())["entries"]
    assert entry["verify"]["passed"] and {c["name"] for c in entry["verify"]["checks"]} >= {"table-rows", "logits"}
    (entry_dir,) = out.iterdir()
    assert json.loads((entry_dir / "precompile.json").read_text())["kind"] == "overlay"
    assert not list(entry_dir.glob("model-*.safetensors"))
    before = tree_snapshot(out)
    r = cli("batch", zoo, "--out-root", out, "--report", tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["summary"] == {"ok": 0, "skipped": 1, "failed": 0}
    assert tree_snapshot(out) == before
