"""A CLI that starts fast: the commands that need no model (`--help`, `--version`, `profiles`, `plan` on a
config) import neither torch nor transformers, and `convert` imports transformers only for its self-check.

Each command runs in a fresh interpreter, as the console script runs it (`precompile.cli.run`), and reports
the modules it imported when it exits. Wall times are benchmarks/bench_startup.py's job, not a test's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

HEAVY = ("torch", "transformers")
# `precompile ARGS`, then the sorted names of sys.modules at exit written to $MODULES_OUT
WRAPPER = ("import atexit, json, os, sys\n"
           "atexit.register(lambda: open(os.environ['MODULES_OUT'], 'w').write(json.dumps(sorted(sys.modules))))\n"
           "sys.argv = ['precompile'] + sys.argv[1:]\n"
           "from precompile.cli import run\n"
           "run()\n")


def imported(tmp_path: Path, *args: str | Path, env: dict[str, str] | None = None) \
        -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `precompile ARGS`; (the process, the top-level packages it imported)."""
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MODULES_OUT": str(out), **(env or {})}
    r = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    return r, {m.split(".")[0] for m in json.loads(out.read_text())}


@pytest.fixture
def config_dir(tmp_path) -> Path:
    """A model directory with config.json and no weights (what `plan` reads for a hub id, too)."""
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(ROOT / "examples" / "tiny-llama" / "config.json", d / "config.json")
    return d


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["profiles"], ["convert", "--help"]],
                         ids=lambda a: " ".join(a))
def test_commands_without_a_model_import_neither_torch_nor_transformers(tmp_path, args):
    r, mods = imported(tmp_path, *args)
    assert r.returncode == 0, r.stderr
    assert not mods & set(HEAVY), f"precompile {' '.join(args)} imported {sorted(mods & set(HEAVY))}"


@pytest.mark.parametrize("kind", ["directory", "config.json", "hub id"])
def test_plan_on_a_config_imports_neither_torch_nor_transformers(tmp_path, config_dir, kind):
    import tiny

    source = {"directory": config_dir, "config.json": config_dir / "config.json", "hub id": "org/tiny"}[kind]
    tiny.lay_out_hub_cache(tmp_path / "hf", "org/tiny", config_dir)  # plan fetches only config.json of a hub id
    r, mods = imported(tmp_path, "plan", source, env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    assert "eliminated" in r.stdout
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_the_check_sees_an_import(tmp_path, config_dir):
    """The probe works: plan with local weights reads them, and torch comes with that."""
    shutil.copytree(ROOT / "examples" / "tiny-llama", config_dir, dirs_exist_ok=True)
    r, mods = imported(tmp_path, "plan", config_dir)
    assert r.returncode == 0, r.stderr
    assert "torch" in mods


def test_profiles_prints_the_shipped_classification(tmp_path):
    from precompile.profiles import shipped

    r, _ = imported(tmp_path, "profiles")
    assert r.returncode == 0, r.stderr
    version, rows = shipped.shipped_matrix()
    assert r.stdout.startswith(shipped.to_text(rows) + "\n")
    assert r.stdout.splitlines()[-1].startswith(f"(the causal LMs of transformers {version}, as in docs/support.md")


def test_convert_without_self_check_imports_no_transformers(tmp_path):
    """convert imports only what it uses: transformers is for the self-check (and models without a shipped
    profile's native type)."""
    r, mods = imported(tmp_path, "convert", ROOT / "examples" / "tiny-llama", tmp_path / "out", "--no-self-check",
                       "-q")
    assert r.returncode == 0, r.stderr
    assert "torch" in mods and "transformers" not in mods
