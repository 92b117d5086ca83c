"""Hostile inputs on the newer surfaces (issue 26): carried files, the hub, the source's card, profile expressions
and YAML, numbers, locks, carried JSON, concurrent writers of OUT_DIR.

Same contract as tests/test_convert_refusals.py (exit 2, one `error:` line, nothing left behind, inputs unchanged; see
conftest.check_refused). Signals, FIFOs, races and the network run real `python -m precompile` processes.
"""

from __future__ import annotations

import json
import os
import pkgutil
import py_compile
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import tiny
from conftest import (ROOT, check_refused, edit_json, fail_after, invoke, leftovers, make_fifo, run_cli, run_cli_here,
                      sha256_of, tree_snapshot)
from precompile.io.out_dir import LOCK_PREFIX
from precompile.loader import MANIFEST
from precompile.publish.card import CARD_FILE

PROFILE = ROOT / "configs" / "llama.yaml"


@pytest.fixture(autouse=True)
def no_hang():
    """A test that blocks fails after three minutes instead of hanging the suite."""
    with fail_after(180):
        yield


def one_error_line(stderr: str, *words: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) >= 1 and lines[-1].startswith("error: "), stderr
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]], stderr
    for w in words:
        assert w.lower() in lines[-1].lower(), f"{w!r} not in {lines[-1]!r}"
    return lines[-1]


def refused(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    return one_error_line(r.stderr, *words)


# ---------------------------------------------------------------- F1: no code from a checkpoint runs


EVIL = "open({marker!r}, 'w').write('ran')\nraise SystemExit('code from the checkpoint ran')\n"


def test_only_data_files_transformers_reads_are_carried(src, out, tmp_path):
    """F1: modules Python could import from OUT_DIR (a sourceless `tokenizers.pyc`, a package, an extension, a
    `.py`) are never carried, whatever their names start with; the shim loads from its file, and importing
    what transformers imports then runs none of them."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    py_compile.compile(str(evil), cfile=str(src / "tokenizers.pyc"), doraise=True)
    py_compile.compile(str(evil), cfile=str(src / "tokenizer_config.pyc"), doraise=True)
    (src / "tokenizers").mkdir()
    (src / "tokenizers" / "__init__.py").write_text(evil.read_text())
    (src / "safetensors.py").write_text(evil.read_text())
    (src / "tokenizer.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    (src / "tokenizer_x.py").write_text(evil.read_text())
    (src / "vocab.json.py").write_text(evil.read_text())
    r = invoke(src, out, "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert [m.name for m in pkgutil.iter_modules([str(out)])] == ["precompile_loader"]
    assert {p.name for p in out.iterdir()} <= {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                               "config.json", "README.md", MANIFEST, "precompile_loader.py",
                                               "precompile_table.safetensors", "model.safetensors.index.json"} | {
        p.name for p in out.glob("model-*.safetensors")}
    shim = str(out / "precompile_loader.py")
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('precompile_loader', {shim!r})\n"
            "shim = importlib.util.module_from_spec(spec); spec.loader.exec_module(shim)\n"
            f"model = shim.load({str(out)!r})\n"
            "import tokenizers, safetensors, transformers\n"
            f"tok = transformers.AutoTokenizer.from_pretrained({str(out)!r})\n"
            f"assert {str(out)!r} not in sys.path and '' not in sys.path\n"
            "print('loaded', type(model).__name__)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env, cwd=out,
                         timeout=300)
    assert res.returncode == 0 and "loaded" in res.stdout, res.stderr
    assert not marker.exists()


def test_tokenizer_auto_map_to_another_repo_is_refused(src, out):
    """F1's sibling: a carried tokenizer_config.json whose auto_map names code in another hub repo, which
    `trust_remote_code=True` (the pipeline recipe) would download and run."""
    edit_json(src / "tokenizer_config.json",
              lambda t: t.update(auto_map={"AutoTokenizer": ["evil/repo--tok.Tok", None]}))
    check_refused(src, out, words=("tokenizer_config.json", "auto_map", "evil/repo--tok.Tok"))


# ---------------------------------------------------------------- U7: the network never hangs


class SilentServer:
    """Accepts connections on 127.0.0.1 and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(c)

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def silent():
    s = SilentServer()
    yield s
    s.close()


def hub_env(silent: SilentServer, tmp_path: Path) -> dict:
    return {"HF_ENDPOINT": f"http://127.0.0.1:{silent.port}", "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "home"), "PRECOMPILE_HUB_TIMEOUT": "1"}


def test_push_to_an_endpoint_that_never_answers(converted, tmp_path, silent):
    """U7: every request times out, is tried HUB_TRIES times, then one line; OUT_DIR unchanged, no lock left."""
    before = tree_snapshot(converted)
    r = run_cli("push", converted, "me/model", "-q", env=hub_env(silent, tmp_path), timeout=120)
    refused(r, "cannot reach the hub", f"127.0.0.1:{silent.port}", "3 tries", "PRECOMPILE_HUB_TIMEOUT")
    assert silent.accepted >= 3
    assert tree_snapshot(converted) == before and not leftovers(converted.parent)


def test_hub_timeout_setting_is_checked(converted, tmp_path, silent):
    env = {**hub_env(silent, tmp_path), "PRECOMPILE_HUB_TIMEOUT": "inf"}
    refused(run_cli("push", converted, "me/model", "-q", env=env), "PRECOMPILE_HUB_TIMEOUT")


# ---------------------------------------------------------------- C4, C5, C3: the source's model card


def test_source_card_that_is_a_fifo(src, out):
    """C4: README.md (read for the card's license) is a FIFO: refused before any work, never opened."""
    make_fifo(src / CARD_FILE)
    check_refused(src, out, words=(CARD_FILE, "FIFO"))


def test_source_card_linked_outside_the_source(src, out, tmp_path):
    """C5: README.md is a link to a file outside SOURCE: nothing of it reaches the card."""
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "notes.md").write_text("---\nlicense: secret-from-outside\n---\n")
    (src / CARD_FILE).symlink_to(tmp_path / "secret" / "notes.md")
    check_refused(src, out, words=(CARD_FILE, "outside"), watch=(tmp_path / "secret",))
    # its siblings, config.json and the index:
    # tests/test_refusals_files_and_paths.py::test_carried_file_symlinked_outside_source


@pytest.mark.parametrize("front", [
    "x: " + "[" * 5000 + "]" * 5000 + "\nlicense: mit\n",  # C3: flow nesting
    "".join("  " * i + "a:\n" for i in range(5000)) + "license: mit\n",  # block nesting
    "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9))
    + "license: mit\n",  # aliases that expand to 9**10 values
], ids=["flow-deep", "block-deep", "aliases"])
def test_source_card_front_matter_too_deep_or_too_large(src, out, front):
    """C3: a malformed source card never fails a conversion, whatever its shape: the card gets no license."""
    (src / CARD_FILE).write_text(f"---\n{front}---\n# model\n")
    before = tree_snapshot(src)
    r = invoke(src, out, "--quiet", "--device", "cpu")
    assert r.exit_code == 0 and "Traceback" not in r.stderr, r.stderr
    meta = yaml.safe_load((out / CARD_FILE).read_text().split("---\n")[1])
    assert "license" not in meta
    assert tree_snapshot(src) == before


# ---------------------------------------------------------------- Y1/M2: expressions; Y3: YAML bounds


def _profile_with(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load(PROFILE.read_text())
    edit(data)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


LONG = " + ".join(["hidden_size"] * 1000)
DEEP = "(" * 40 + "hidden_size" + ")" * 40


@pytest.mark.parametrize("expr", [LONG, " + ".join(["1"] * 20000), DEEP], ids=["1000-terms", "20000-terms", "deep"])
def test_long_expression_in_a_profile(src, out, tmp_path, expr):
    """Y1: a config-ref expression is bounded before it is parsed: one line naming the key, for convert and plan."""
    p = _profile_with(tmp_path, lambda d: d["sizes"].update(hidden_size=[expr]))
    check_refused(src, out, "--profile", str(p), words=(str(p), "sizes.hidden_size"))
    refused(run_cli_here("plan", src, "--profile", p), "sizes.hidden_size")


def test_long_expression_in_a_recorded_profile(converted, tmp_path):
    """M2: the same expression in a manifest's recorded profile text: verify and plan refuse it in one line."""
    out = tiny.copy_tree(converted, tmp_path / "out")
    m = json.loads((out / MANIFEST).read_text())
    data = yaml.safe_load(m["profile"]["text"])
    data["sizes"]["hidden_size"] = [LONG]
    m["profile"]["text"] = yaml.safe_dump(data)
    (out / MANIFEST).write_text(json.dumps(m))
    before = tree_snapshot(out)
    refused(run_cli_here("verify", out, "-q"), "sizes.hidden_size")
    refused(run_cli_here("plan", out), "sizes.hidden_size")
    assert tree_snapshot(out) == before


def alias_when(levels: int = 10) -> str:
    """A `when:` mapping whose values are aliases nested `levels` deep, 9 to a level: 9**levels values expanded."""
    names = [f"k{i}" for i in range(levels)]
    parts = [f"{names[0]}: &{names[0]} [x, x, x, x, x, x, x, x, x]"]
    parts += [f"{n}: &{n} [{', '.join([f'*{names[i]}'] * 9)}]" for i, n in enumerate(names[1:])]
    return "{" + ", ".join(parts) + "}"


def test_profile_with_nested_aliases_is_refused_at_once(src, out, tmp_path):
    """Y3: a 3 KB profile whose aliases (compared through variants[].when) expand to 9**10 values is refused
    while it is read, in a real process: nothing walks or compares the expansion."""
    bomb = PROFILE.read_text() + f"variants:\n  - when: {alias_when()}\n    set: {{block: parallel}}\n"
    p = tmp_path / "bomb.yaml"
    p.write_text(bomb)
    assert len(bomb) < 4000
    before = tree_snapshot(src)
    refused(run_cli("convert", src, out, "--profile", p, "--quiet", timeout=60), str(p), "aliases expand")
    refused(run_cli("plan", src, "--profile", p, timeout=60), str(p), "aliases expand")
    assert tree_snapshot(src) == before and not out.exists() and not leftovers(tmp_path)


def test_sigterm_while_reading_a_large_profile(src, out, tmp_path):
    """Y3: the largest profile within the bounds is read in a moment and SIGTERM still ends the run as
    `error: interrupted`, nothing left behind."""
    lines = [f"k{i}: [{', '.join(['1'] * 9)}]" for i in range(9000)]
    p = tmp_path / "big.yaml"
    p.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "precompile", "convert", str(src), str(out), "--profile",
                             str(p)], env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (2, 130), err
    one_error_line(err)
    assert not out.exists() and not leftovers(tmp_path)


# ---------------------------------------------------------------- Y4/N2: numbers are finite and in range


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400", str(2**1100)])
@pytest.mark.parametrize("key", ["hidden_size", "eps"])
def test_profile_number_not_finite(src, out, tmp_path, value, key):
    """Y4: `hidden_size: .inf` (and friends) in a profile is one line naming the file and the key."""
    data = yaml.safe_load(PROFILE.read_text())
    (data["sizes"] if key == "hidden_size" else data["attn_norm"])[key] = "@@"
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data).replace("'@@'", value))
    check_refused(src, out, "--profile", str(p), words=(str(p), key, "finite"))


NOT_FINITE = ["Infinity", "-Infinity", "1e400", "NaN", "1" + "0" * 400]


@pytest.mark.parametrize("key, value", [(k, v) for k in ("hidden_size", "vocab_size", "num_attention_heads",
                                                         "rms_norm_eps") for v in NOT_FINITE]
                         + [("hidden_size", "1e300"), ("num_attention_heads", "100000")])
def test_config_number_not_finite(src, out, value, key):
    """N2: Infinity, -Infinity, 1e400 (and integers past a float, or sizes past any model's) in config.json."""
    text = json.loads((src / "config.json").read_text())
    text[key] = "@@"
    (src / "config.json").write_text(json.dumps(text).replace('"@@"', value))
    line = check_refused(src, out, words=())
    assert key in line or "eps" in line, line
    r = run_cli_here("plan", src)
    refused(r)


# ---------------------------------------------------------------- L2: the lock path


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_lock_path_that_is_not_a_file(src, out, tmp_path, kind):
    """L2: `.precompile-lock-<name>` is a FIFO (or a directory, or a link): one line, and it is left alone."""
    lock = out.parent / f"{LOCK_PREFIX}{out.name}"
    if kind == "fifo":
        os.mkfifo(lock)
    elif kind == "directory":
        lock.mkdir()
    else:
        (tmp_path / "elsewhere").write_text("x")
        lock.symlink_to(tmp_path / "elsewhere")
    before = tree_snapshot(src)
    r = invoke(src, out, "--quiet", "--device", "cpu")
    assert r.exit_code == 2, r.stderr
    one_error_line(r.stderr, str(lock))
    assert not out.exists() and tree_snapshot(src) == before
    assert lock.is_symlink() or lock.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".precompile-tmp")] == []


# ---------------------------------------------------------------- F3: carried JSON of the wrong shape


@pytest.mark.parametrize("name, text, words", [
    ("generation_config.json", "[1, 2, 3]", ("generation_config.json", "array")),
    ("generation_config.json", '"greedy"', ("generation_config.json", "string")),
    ("generation_config.json", '{"max_new_tokens": "many"}', ("generation_config.json", "transformers")),
    ("special_tokens_map.json", "[]", ("special_tokens_map.json", "array")),
    ("tokenizer_config.json", "7", ("tokenizer_config.json",)),
    ("added_tokens.json", "null", ("added_tokens.json",)),
    ("chat_template.json", '{"chat_template": 5}', ("chat_template.json", "chat_template")),
])
def test_carried_json_of_the_wrong_shape(src, out, name, text, words):
    """F3: a carried JSON file transformers could not read is refused before any work, never carried."""
    (src / name).write_text(text)
    check_refused(src, out, words=words)


def test_damaged_generation_config_in_out_dir_fails_verify(converted, tmp_path):
    """F3's sibling: an OUT_DIR whose generation_config.json was replaced by an array fails verify (exit 1, one
    line) instead of a TypeError traceback."""
    out = tiny.copy_tree(converted, tmp_path / "out")
    (out / "generation_config.json").write_text("[1, 2]")
    r = run_cli_here("verify", out, "-q", "--rows", "8", "--max-new-tokens", "2")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("verification failed:")


# ---------------------------------------------------------------- K1: one writer of OUT_DIR's files


def test_two_update_card_runs_at_once(converted, tmp_path):
    """K1: two `verify --update-card` on one OUT_DIR: the second is refused at once (the lock), the first updates
    the card, and the card matches its recorded sha256."""
    out = tiny.copy_tree(converted, tmp_path / "out")
    lock = out.parent / f"{LOCK_PREFIX}{out.name}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "precompile", "verify", str(out), "--update-card", "-q",
                              "--rows", "16", "--max-new-tokens", "2"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the first run never took the lock"
    second = run_cli("verify", out, "--update-card", "-q")
    refused(second, "another precompile process", str(out))
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["outputs"][CARD_FILE] == sha256_of(out / CARD_FILE)
    assert "Passed" in (out / CARD_FILE).read_text()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")] and not leftovers(tmp_path)
