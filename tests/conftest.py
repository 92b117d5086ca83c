"""Shared fixtures: tiny checkpoints (built once per session) and a CLI runner in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tiny
from precompile.cli import main
from precompile.convert import convert
from precompile.io.out_dir import LOCK_PREFIX, TMP_PREFIX

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, dtype="float32", **config_overrides) -> a sharded HF directory (cached)."""
    made: dict = {}

    def make(family: str, dtype: str = "float32", seed: int = 0, shard_kb: int | None = 40, **overrides) -> Path:
        key = (family, dtype, seed, shard_kb, repr(sorted(overrides.items())))  # values may be lists
        if key not in made:
            d = tmp_path_factory.mktemp(f"{family}-{dtype}")
            tiny.save_checkpoint(tiny.build_model(family, seed, **overrides), d / "model", DTYPES[dtype], shard_kb)
            made[key] = d / "model"
        return made[key]

    return make


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m precompile ...` as a user would; the source tree comes first on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "precompile", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def tree_snapshot(path: Path) -> dict[str, tuple[int, float, bytes]]:
    """Every file below path with its size, mtime and bytes: proves an input was left untouched."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


# ---------------------------------------------------------------- bad-input helpers (tests/test_bad_inputs*.py)


@contextmanager
def fail_after(seconds: int):
    """A test that blocks (a FIFO opened for reading, a socket that never answers) fails after `seconds`
    instead of hanging the suite."""
    def fail(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def invoke(*args: str | Path):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def leftovers(*dirs: Path) -> list[str]:
    """Temporary directories and lock files a run left beside OUT_DIR (or the source)."""
    return [str(p) for d in dirs if d.is_dir() for p in d.iterdir() if p.name.startswith((TMP_PREFIX, LOCK_PREFIX))]


def check_refused(src: Path, out: Path, *extra: str, words: tuple[str, ...], source_arg: str | None = None,
                  watch: tuple[Path, ...] = ()) -> str:
    """Run convert and assert the whole contract of a refusal; returns the error line."""
    watched = [p for p in (src, *watch) if p.exists()]
    before = {p: tree_snapshot(p) for p in watched}
    out_before = tree_snapshot(out) if out.is_dir() else (out.read_bytes() if out.is_file() else None)
    r = invoke(source_arg if source_arg is not None else src, out, "--quiet", "--device", "cpu", *extra)
    assert isinstance(r.exception, SystemExit), f"uncaught {r.exception!r}:\n{r.stderr}"
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"
    if out_before is None:
        assert not out.exists(), f"{out} was left behind"
    elif isinstance(out_before, bytes):
        assert out.read_bytes() == out_before
    else:
        assert tree_snapshot(out) == out_before, f"{out} was changed"
    assert not leftovers(out.parent, src.parent), leftovers(out.parent, src.parent)
    for p, snap in before.items():
        assert tree_snapshot(p) == snap, f"input {p} was changed"
    return lines[0]


def read_st(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def shard_of(src: Path, name: str) -> Path:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / index["weight_map"][name]


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def base(checkpoint) -> Path:
    return checkpoint("llama")


@pytest.fixture
def src(base, tmp_path) -> Path:
    return tiny.copy_tree(base, tmp_path / "src")


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


@pytest.fixture(scope="module")
def converted(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "out"
    convert(str(base), out, device="cpu")
    return out


@pytest.fixture(scope="module")
def slow_source(checkpoint) -> Path:
    """A tiny model with a large vocabulary: at --chunk-size 1 the table takes many seconds to write."""
    return checkpoint("llama", vocab_size=30000, shard_kb=None)
