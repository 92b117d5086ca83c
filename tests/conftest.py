"""Shared fixtures: tiny checkpoints (built once per session) and a CLI runner in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, dtype="float32", **config_overrides) -> a sharded HF directory (cached)."""
    made: dict = {}

    def make(family: str, dtype: str = "float32", seed: int = 0, shard_kb: int | None = 40, **overrides) -> Path:
        key = (family, dtype, seed, shard_kb, tuple(sorted(overrides.items())))
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
