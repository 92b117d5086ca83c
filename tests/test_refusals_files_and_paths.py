"""Refused inputs that are paths or files of an unexpected kind, and their siblings (issue 18).

A shard in a subfolder beside a namesake, FIFOs and other non-regular files, negative dimensions, batch entries
whose files changed, hub downloads that fetch only what the index names, paths that leave SOURCE, JSON too deep,
OUT_DIR as a symlink or `.`, write errors, report paths, seeds and hub ids, line breaks echoed from the input.
Same contract as tests/test_convert_refusals.py (exit 2, one final `error:` line, nothing left behind, inputs
unchanged; see conftest.check_refused); a damaged OUT_DIR must fail `verify` (exit 1) and make `precompile.load`
raise.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tiny
from conftest import (ROOT, check_refused, cli_in_process, edit_json, invoke, leftovers, make_fifo, one_error_line,
                      read_st, run_cli, shard_of, tree_snapshot, verify_report, write_st)
from precompile.loader import INDEX, MANIFEST, PrecompileLoadError, load
from precompile.plan.table_layout import TABLE_FILE

EMB = "model.embed_tokens.weight"
K = "model.layers.0.self_attn.k_proj.weight"
UP2 = "model.layers.2.mlp.up_proj.weight"  # copied unchanged into OUT_DIR

pytestmark = pytest.mark.usefixtures("no_hang")  # a test that blocks fails after 90 s (conftest)


# ---------------------------------------------------------------- 1: a shard in a subfolder, a namesake at the root


def test_subfolder_shard_beside_a_namesake(src, out, converted, tmp_path):
    f = shard_of(src, UP2)
    (src / "sub").mkdir()
    f.rename(src / "sub" / f.name)
    edit_json(src / INDEX, lambda i: i["weight_map"].update(
        {k: f"sub/{v}" for k, v in i["weight_map"].items() if v == f.name}))
    save_file({"decoy": torch.zeros(3)}, f)  # same name at the root, other content
    before = tree_snapshot(src)
    r = invoke(src, out, "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert tree_snapshot(src) == before and not leftovers(out.parent)
    wm = json.loads((out / INDEX).read_text())["weight_map"]
    assert set(wm) == set(json.loads((converted / INDEX).read_text())["weight_map"])
    assert wm[UP2] == f"sub--{f.name}"
    got = {k: v for s in set(wm.values()) for k, v in load_file(out / s).items()}
    want = {k: v for s in set(wm.values()) for k, v in load_file(converted / s.replace("sub--", "")).items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    code, err, checks = verify_report(out, tmp_path)
    assert code == 0 and checks["copied-tensors"]["passed"], err


# ---------------------------------------------------------------- 2: FIFOs and other non-regular files


@pytest.mark.parametrize("name", ["config.json", INDEX, "shard", "tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json"])
def test_fifo_in_source_is_refused(src, out, name):
    path = shard_of(src, K) if name == "shard" else src / name
    make_fifo(path)
    check_refused(src, out, words=(path.name, "FIFO"))


@pytest.mark.parametrize("name", [TABLE_FILE, "shard"])
def test_fifo_in_out_dir_fails_verify_and_load(converted, tmp_path, name):
    out = tiny.copy_tree(converted, tmp_path / "out")
    path = out / (json.loads((out / INDEX).read_text())["weight_map"][UP2] if name == "shard" else name)
    make_fifo(path)
    code, err, checks = verify_report(out, tmp_path)
    assert code == 1 and not checks["integrity"]["passed"] and not checks["load"]["passed"], err
    with pytest.raises(PrecompileLoadError, match="not a regular file"):
        load(out)


def test_fifo_profile_is_refused(src, out, tmp_path):
    make_fifo(tmp_path / "p.yaml")
    check_refused(src, out, "--profile", tmp_path / "p.yaml", words=("p.yaml", "FIFO"))


def test_fifo_prompts_of_verify(converted, tmp_path):
    make_fifo(tmp_path / "prompts.txt")
    code, err = cli_in_process("verify", converted, "--quiet", "--prompts", tmp_path / "prompts.txt")
    assert code == 2
    one_error_line(err, "prompts.txt", "FIFO")


def test_fifo_zoo_of_batch(tmp_path):
    make_fifo(tmp_path / "zoo.yaml")
    code, err = cli_in_process("batch", tmp_path / "zoo.yaml", "--out-root", tmp_path / "root", "--quiet")
    assert code == 2 and not (tmp_path / "root").exists()
    one_error_line(err, "zoo.yaml", "FIFO")


def test_fifo_config_of_plan(tmp_path):
    make_fifo(tmp_path / "config.json")
    code, err = cli_in_process("plan", tmp_path / "config.json")
    assert code == 2
    one_error_line(err, "config.json", "FIFO")


# ---------------------------------------------------------------- 3: negative dimensions


@pytest.mark.parametrize("name", [EMB, UP2], ids=["layer0", "copied"])
def test_negative_dimensions_in_header(src, out, name):
    f = shard_of(src, name)
    header, body = read_st(f)
    header[name]["shape"] = [-d for d in header[name]["shape"]]  # product and byte count unchanged
    write_st(f, header, body)
    check_refused(src, out, words=(f.name, name, "negative"))


# ---------------------------------------------------------------- 7: batch checks sizes and hashes


def test_batch_converts_a_damaged_entry_again(base, tmp_path):
    shutil.copytree(base, tmp_path / "m")
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"models": [{"source": str(tmp_path / "m"), "out": "m"}]}))
    root, report = tmp_path / "root", tmp_path / "report.json"

    def run() -> dict:
        code, err = cli_in_process("batch", zoo, "--out-root", root, "--report", report, "--quiet")
        assert code == 0, err
        return json.loads(report.read_text())["entries"][0]

    assert run()["status"] == "ok"
    table = root / "m" / TABLE_FILE
    good = table.read_bytes()
    assert run()["status"] == "skipped"
    table.write_bytes(good[:-100])
    entry = run()
    assert entry["status"] == "ok" and TABLE_FILE in entry["reason"] and "(size)" in entry["reason"]
    assert table.read_bytes() == good
    table.write_bytes(good[:-4] + bytes(b ^ 0xFF for b in good[-4:]))
    entry = run()
    assert entry["status"] == "ok" and "(hash)" in entry["reason"] and table.read_bytes() == good
    assert run()["status"] == "skipped"


@pytest.mark.parametrize("flag", ["--report", "--junit"])
def test_batch_report_into_missing_dir_fails_before_work(base, tmp_path, flag):
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"models": [{"source": str(base), "out": "m"}]}))
    code, err = cli_in_process("batch", zoo, "--out-root", tmp_path / "root", flag, tmp_path / "no" / "r.json")
    assert code == 2
    one_error_line(err, flag, "does not exist")
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------- 8: hub downloads fetch only what the index names


SPY = r"""
import json, sys
import huggingface_hub
asked = []
for fn in ("snapshot_download", "hf_hub_download"):
    def spy(*a, _real=getattr(huggingface_hub, fn), _fn=fn, **k):
        asked.append([_fn, k.get("allow_patterns") if _fn == "snapshot_download" else (a[1:2] or [k.get("filename")])])
        return _real(*a, **k)
    setattr(huggingface_hub, fn, spy)
import atexit
log = sys.argv[1]
atexit.register(lambda: open(log, "w").write(json.dumps(asked)))
sys.argv = ["precompile"] + sys.argv[2:]
from precompile.cli import run
run()
"""


@pytest.mark.parametrize("sharded", [True, False], ids=["index", "single-file"])
def test_hub_convert_never_asks_for_consolidated(checkpoint, tmp_path, sharded):
    src = checkpoint("llama", shard_kb=40 if sharded else None)
    hf_home = tmp_path / "hf"
    snap = tiny.lay_out_hub_cache(hf_home, "tiny-org/tiny-mistral-like", src)
    # what Mistral's repos ship beside the HF files: not in the cache, so offline it cannot be had at all
    (snap / "consolidated.safetensors").symlink_to(Path("../../blobs") / ("f" * 64))
    before = tree_snapshot(hf_home)
    log, out = tmp_path / "asked.json", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)}
    r = subprocess.run([sys.executable, "-c", SPY, str(log), "convert", "tiny-org/tiny-mistral-like", str(out),
                        "--quiet", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    asked = json.loads(log.read_text())
    assert asked, "no download was asked for"
    for _, patterns in asked:
        assert not any(fnmatch.fnmatch("consolidated.safetensors", p) for p in patterns or ["*"]), asked
    assert "consolidated.safetensors" not in json.loads((out / MANIFEST).read_text())["source"]["files"]
    assert tree_snapshot(hf_home) == before and not leftovers(tmp_path)


# ---------------------------------------------------------------- weak: paths that leave SOURCE


def test_weight_map_with_dotdot(src, out, tmp_path):
    f = shard_of(src, K)
    (tmp_path / "other").mkdir()
    shutil.copy(f, tmp_path / "other" / f.name)
    edit_json(src / INDEX, lambda i: i["weight_map"].update(
        {k: f"../other/{v}" for k, v in i["weight_map"].items() if v == f.name}))
    check_refused(src, out, words=(f"../other/{f.name}", "outside"), watch=(tmp_path / "other",))


def test_weight_file_symlinked_outside_source(src, out, tmp_path):
    f = shard_of(src, K)
    (tmp_path / "other").mkdir()
    f.rename(tmp_path / "other" / f.name)
    f.symlink_to(tmp_path / "other" / f.name)
    check_refused(src, out, words=(f.name, "outside"), watch=(tmp_path / "other",))


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json",
                                  "config.json", "model.safetensors.index.json"])  # the last two: issue 26, C5
def test_carried_file_symlinked_outside_source(src, out, tmp_path, name):
    (tmp_path / "secret").mkdir()
    (src / name).rename(tmp_path / "secret" / name)
    (src / name).symlink_to(tmp_path / "secret" / name)
    check_refused(src, out, words=(name, "outside"), watch=(tmp_path / "secret",))


def test_no_code_file_is_carried(src, out):
    (src / "tokenizer_custom.py").write_text("raise SystemExit('code from the checkpoint ran')\n")
    edit_json(src / "tokenizer_config.json",
              lambda t: t.update(auto_map={"AutoTokenizer": ["tokenizer_custom.X", None]}))
    r = invoke(src, out, "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert not list(out.glob("*.py"))[1:] and [p.name for p in out.glob("*.py")] == ["precompile_loader.py"]


# ---------------------------------------------------------------- weak: JSON too deep, tokenizers of the wrong shape


DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", INDEX])
def test_deeply_nested_json(src, out, name):
    (src / name).write_text(DEEP)
    check_refused(src, out, words=(name, "nested too deeply"))


def test_deeply_nested_manifest(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "out")
    (out / MANIFEST).write_text(DEEP)
    code, err = cli_in_process("verify", out, "--quiet")
    assert code == 2
    one_error_line(err, MANIFEST)
    with pytest.raises(PrecompileLoadError, match=MANIFEST):
        load(out)


@pytest.mark.parametrize("edit", [
    lambda t: t.update(added_tokens=5),
    lambda t: t["model"].update(type="Unigram", vocab=[[]]),
    lambda t: t["model"].update(vocab={"a": "zero"}),
    lambda t: t.clear() or t.update(hello="world"),
], ids=["added-int", "unigram-empty", "vocab-str-ids", "not-a-tokenizer"])
def test_tokenizer_json_of_the_wrong_shape(src, out, edit):
    edit_json(src / "tokenizer.json", edit)
    check_refused(src, out, words=("tokenizer.json",))


# ---------------------------------------------------------------- weak: OUT_DIR as a symlink, dangling, or `.`


def test_out_dir_symlink_with_force(src, converted, tmp_path):
    target = tiny.copy_tree(converted, tmp_path / "real" / "prev")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "out"
    link.symlink_to(target)
    r = invoke(src, link, "--quiet", "--device", "cpu", "--force")
    assert r.exit_code == 0, r.stderr
    assert link.is_symlink() and link.resolve() == target and (target / MANIFEST).is_file()
    assert json.loads((target / MANIFEST).read_text())["source"]["path"] == str(src.resolve())
    assert not leftovers(tmp_path / "links", tmp_path / "real")


def test_out_dir_dangling_symlink(src, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    check_refused(src, link, words=("symlink", "does not exist"))
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_out_dir_dot(base, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    r = run_cli("convert", base, ".", "--quiet", "--device", "cpu", cwd=here)
    assert r.returncode == 0, r.stderr
    assert (here / MANIFEST).is_file() and not leftovers(tmp_path)
    r = run_cli("convert", base, ".", "--quiet", "--device", "cpu", cwd=here)
    assert r.returncode == 2 and "not empty" in one_error_line(r.stderr)


# ---------------------------------------------------------------- weak: write errors are one line


def test_disk_full_while_writing(src, out, monkeypatch):
    import precompile.io.shard_writer as writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer, "_write_tensor", full)
    check_refused(src, out, words=(str(out), "No space left", "ENOSPC", "free some space"))


def test_file_size_limit_while_writing(slow_source, tmp_path):
    """A real EFBIG: `ulimit -f` below the table's size, SIGXFSZ ignored as shells often do."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "out"
    before = tree_snapshot(slow_source)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-m", "precompile", "convert", str(slow_source), str(out), "--quiet",
                        "--device", "cpu"], env=env, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert r.returncode == 2, r.stderr
    one_error_line(r.stderr, str(out), "EFBIG", "ulimit -f")
    assert not out.exists() and not leftovers(tmp_path) and tree_snapshot(slow_source) == before


# ---------------------------------------------------------------- weak: report paths, seeds, hub ids


@pytest.mark.parametrize("name", [MANIFEST, "report.json"])
def test_verify_json_into_out_dir_refused(converted, tmp_path, name):
    out = tiny.copy_tree(converted, tmp_path / "out")
    before = tree_snapshot(out)
    code, err = cli_in_process("verify", out, "--quiet", "--json", out / name)
    assert code == 2
    one_error_line(err, "--json", "inside")
    assert tree_snapshot(out) == before


def test_verify_seed_out_of_range(converted):
    code, err = cli_in_process("verify", converted, "--quiet", "--seed", str(2**70))
    assert code == 2
    one_error_line(err, "--seed", "out of range")


@pytest.mark.parametrize("command", ["convert", "plan"])
@pytest.mark.parametrize("repo", ["org/na..me", "org--x/name", "org/name-"])
def test_malformed_hub_id(tmp_path, command, repo):
    args = [command, repo] + ([tmp_path / "out", "--quiet"] if command == "convert" else [])
    code, err = cli_in_process(*args)
    assert code == 2
    one_error_line(err, repo)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- line breaks echoed from the input

@pytest.mark.parametrize("where", ["profile value", "profile key", "config value"])
def test_line_break_in_echoed_input_stays_one_line(src, out, tmp_path, where):
    """Messages quote the bad value or key; a line break in it is shown escaped, never as a second line."""
    llama = yaml.safe_load((ROOT / "configs" / "llama.yaml").read_text())
    extra: tuple = ()
    if where == "config value":
        cfg = json.loads((src / "config.json").read_text())
        cfg["hidden_act"] = "si\nlu"
        (src / "config.json").write_text(json.dumps(cfg))
        words: tuple[str, ...] = ("si\\nlu",)
    else:
        if where == "profile value":
            llama["block"] = "ser\nial"
            words = ("ser\\nial", "block")
        else:
            llama["extra\nkey"] = 1
            words = ("extra\\nkey",)
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(llama))
        extra = ("--profile", tmp_path / "p.yaml")
    check_refused(src, out, *extra, words=words)
