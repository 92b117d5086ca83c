"""Bad inputs, round two (issue 18): the cases an adversarial pass broke, and their siblings.

Same contract as tests/test_bad_inputs.py (exit 2, one final `error:` line, nothing left behind, inputs
unchanged; see conftest.check_refused); tampered outputs must fail `verify` (exit 1) and make
`precompile.load` raise. Races and interrupts run real concurrent `python -m precompile` processes.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import tiny
from conftest import ROOT, check_refused, edit_json, fail_after, invoke, leftovers, read_st, run_cli, shard_of, \
    tree_snapshot, write_st
from precompile.cli import main
from precompile.loader import INDEX, MANIFEST, PrecompileLoadError, load
from precompile.plan.table_layout import TABLE_FILE

EMB = "model.embed_tokens.weight"
K = "model.layers.0.self_attn.k_proj.weight"
UP2 = "model.layers.2.mlp.up_proj.weight"  # copied unchanged into OUT_DIR


@pytest.fixture(autouse=True)
def no_hang():
    """A test that blocks (a FIFO opened for reading) fails after a minute instead of hanging the suite."""
    with fail_after(90):
        yield


def cli_in_process(*args) -> tuple[int, str]:
    """Any command through click's runner: (exit status, stderr); an uncaught exception fails the test."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert isinstance(r.exception, SystemExit) or r.exception is None, f"uncaught {r.exception!r}\n{r.stderr}"
    return r.exit_code, r.stderr


def one_error_line(stderr: str, *words: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert [ln for ln in lines if ln.startswith(("error:", "verification failed:"))] == [lines[-1]], stderr
    for w in words:
        assert w.lower() in lines[-1].lower(), f"{w!r} not in {lines[-1]!r}"
    return lines[-1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rehash(out: Path, *names: str) -> None:
    """Record the current sha256 (and size) of OUT_DIR files in its manifest, as a careful tamperer would."""
    def fix(m):
        for n in names:
            m["outputs"][n] = sha(out / n)
            m.setdefault("output_sizes", {})[n] = (out / n).stat().st_size
    edit_json(out / MANIFEST, fix)


def verify_report(out: Path, tmp_path: Path, *extra) -> tuple[int, str, dict]:
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    code, err = cli_in_process("verify", out, "--quiet", "--device", "cpu", "--rows", "32", "--max-new-tokens", "2",
                               "--json", report, *extra)
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]} if report.exists() else {}
    return code, err, checks


def make_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


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


# ---------------------------------------------------------------- 9: a tensor missing or replaced in OUT_DIR


def _drop_from_output(out: Path, name: str) -> None:
    wm = json.loads((out / INDEX).read_text())["weight_map"]
    shard = out / wm[name]
    sd = load_file(shard)
    sd.pop(name)
    save_file(sd, shard, metadata={"format": "pt"})
    edit_json(out / INDEX, lambda i: i["weight_map"].pop(name))
    rehash(out, shard.name, INDEX)


def test_output_missing_a_tensor_fails_verify_and_load(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "out")
    _drop_from_output(out, UP2)
    code, err, checks = verify_report(out, tmp_path)
    assert code == 1, err
    one_error_line(err, "verification failed", "copied-tensors")
    assert not checks["copied-tensors"]["passed"]
    assert UP2 in checks["copied-tensors"]["metrics"]["dropped_not_eliminated"]
    with pytest.raises(PrecompileLoadError, match="lacks 1 weight"):
        load(out)


def test_output_tensor_replaced_fails_verify(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "out")
    wm = json.loads((out / INDEX).read_text())["weight_map"]
    shard = out / wm[UP2]
    sd = load_file(shard)
    sd[UP2] = torch.randn_like(sd[UP2])
    save_file(sd, shard, metadata={"format": "pt"})
    rehash(out, shard.name)
    code, err, checks = verify_report(out, tmp_path)
    assert code == 1 and not checks["copied-tensors"]["passed"], err
    assert UP2 in checks["copied-tensors"]["metrics"]["mismatched"]


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


# ---------------------------------------------------------------- 4, 5: races with real processes


@contextmanager
def _start(source: Path, out: Path, *extra: str) -> Iterator[subprocess.Popen]:
    """`precompile convert` in a real process of its own, killed if the test leaves it running."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "precompile", "convert", str(source), str(out), "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _wait_for(proc: subprocess.Popen, ready, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"the conversion ended before {what}: {proc.communicate()}")


def _table_started(parent: Path, name: str):
    def ready() -> bool:
        t = parent / f".precompile-tmp-{name}-"
        return any(p.name.startswith(t.name) and (p / TABLE_FILE).is_file() and (p / TABLE_FILE).stat().st_size
                   for p in parent.iterdir())
    return ready


def test_out_dir_filled_by_another_program_during_convert(slow_source, tmp_path):
    """Case 4: OUT_DIR appears and gets a file while the conversion runs; without --force it is kept."""
    out = tmp_path / "out"
    before = tree_snapshot(slow_source)
    with _start(slow_source, out, "--chunk-size", "64", "--quiet") as proc:
        _wait_for(proc, _table_started(tmp_path, "out"), "OUT_DIR could be filled")
        out.mkdir()
        (out / "theirs.txt").write_text("not yours")
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    one_error_line(err, str(out), "another program", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "not yours"
    assert not leftovers(tmp_path) and tree_snapshot(slow_source) == before


def test_second_convert_into_the_same_out_dir_is_refused(slow_source, base, tmp_path):
    """Case 5: while one convert holds OUT_DIR's lock, another one (even with --force) is refused, naming it."""
    out = tmp_path / "out"
    with _start(slow_source, out, "--chunk-size", "1", "--quiet") as first:
        _wait_for(first, _table_started(tmp_path, "out"), "the second convert started")
        assert (tmp_path / ".precompile-lock-out").is_file()
        second = run_cli("convert", base, out, "--quiet", "--device", "cpu", "--force")
        assert second.returncode == 2, second.stderr
        one_error_line(second.stderr, f"pid {first.pid}", str(out))
        assert first.poll() is None
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    assert not out.exists() and not leftovers(tmp_path)


def test_stale_temp_of_a_killed_run_is_removed(slow_source, base, tmp_path):
    out = tmp_path / "out"
    with _start(slow_source, out, "--chunk-size", "1", "--quiet") as proc:
        _wait_for(proc, _table_started(tmp_path, "out"), "it could be killed")
        proc.kill()
        proc.communicate()
    assert any(p.name.startswith(".precompile-tmp-out-") for p in tmp_path.iterdir())
    r = invoke(base, out, "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert "that no longer exists" in r.stderr and f"pid {proc.pid}" in r.stderr
    assert (out / MANIFEST).is_file() and not leftovers(tmp_path)


# ---------------------------------------------------------------- 6: the manifest names another table


def test_manifest_names_a_clean_copy_of_a_damaged_table(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "out")
    shutil.copy(out / TABLE_FILE, out / "clean.safetensors")
    header, body = read_st(out / TABLE_FILE)
    body = bytearray(body)
    body[:256] = b"\x7f" * 256  # rows of token 0 and 1 become huge values
    write_st(out / TABLE_FILE, header, bytes(body))
    edit_json(out / MANIFEST, lambda m: m["table"].update(file="clean.safetensors"))
    rehash(out, TABLE_FILE, "clean.safetensors")
    code, err, checks = verify_report(out, tmp_path, "--rows", "all")
    assert code == 1, err
    one_error_line(err, "verification failed", "integrity")
    assert not checks["integrity"]["passed"] and "clean.safetensors" in checks["integrity"]["metrics"]["table_file"]
    assert not checks["table-rows"]["passed"]  # the rows checked are the ones the model loads
    with pytest.raises(PrecompileLoadError, match="clean.safetensors"):
        load(out)


@pytest.mark.parametrize("damage, words", [
    (lambda m: m["table"].update(file="../elsewhere/precompile_table.safetensors"), ("table.file",)),
    (lambda m: m["table"].update(file="/etc/passwd"), ("table.file",)),
    (lambda m: m["outputs"].update({"../x": "0" * 64}), ("outputs",)),
    (lambda m: m["source"]["files"].update({"../../etc/passwd": "0" * 64}), ("source.files",)),
    (lambda m: m["table"].update(columns="nope"), ("table.columns",)),
    (lambda m: m["loader"].update(hidden_size="64"), ("hidden_size",)),
    (lambda m: m.update(eliminated={"a": 1}), ("eliminated",)),
], ids=["table-dotdot", "table-absolute", "outputs-dotdot", "source-dotdot", "columns-str", "hidden-str",
        "eliminated-dict"])
def test_malformed_manifest_is_one_line(converted, tmp_path, damage, words):
    out = tiny.copy_tree(converted, tmp_path / "out")
    edit_json(out / MANIFEST, damage)
    code, err = cli_in_process("verify", out, "--quiet", "--device", "cpu")
    assert code == 2
    one_error_line(err, MANIFEST, "malformed", *words)
    with pytest.raises(PrecompileLoadError, match="malformed"):
        load(out)


def test_output_index_naming_a_file_outside(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "out")
    edit_json(out / INDEX, lambda i: i["weight_map"].update({UP2: "../other/x.safetensors"}))
    rehash(out, INDEX)
    code, err, checks = verify_report(out, tmp_path)
    assert code == 1 and not checks["integrity"]["passed"], err
    with pytest.raises(PrecompileLoadError, match="not a file inside"):
        load(out)


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


# ---------------------------------------------------------------- weak: SIGINT at any moment


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5, 3.0])
def test_sigint_at_any_moment_never_replaces(slow_source, base, tmp_path, delay):
    out = tmp_path / "out"
    CliRunner().invoke(main, ["convert", str(base), str(out), "--quiet", "--device", "cpu"])
    before = tree_snapshot(out)
    with _start(slow_source, out, "--chunk-size", "4", "--quiet", "--force") as proc:
        time.sleep(delay)
        assert proc.poll() is None, f"finished within {delay} s: {proc.communicate()}"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=50)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err
    assert tree_snapshot(out) == before and not leftovers(tmp_path)


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
