"""Concurrent and interrupted conversions (issue 18), with real `python -m precompile` processes: OUT_DIR
filled by another program meanwhile, a second convert into the same OUT_DIR, the stale temp of a killed run,
and SIGINT at any moment never replacing a previous OUT_DIR.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from click.testing import CliRunner

from conftest import ROOT, invoke, leftovers, one_error_line, run_cli, tree_snapshot
from precompile.cli import main
from precompile.loader import MANIFEST
from precompile.plan.table_layout import TABLE_FILE

pytestmark = pytest.mark.usefixtures("no_hang")  # a test that blocks fails after 90 s (conftest)


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
