"""The process-wide tuning of the `precompile` program (precompile/io/process_memory.py), never applied by the
library."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from precompile.io.process_memory import THP_ENV

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_MODE = THP.read_text().split("[")[1].split("]")[0] if THP.exists() else "never"

FAULTS = """
import resource
{setup}
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64 << 20, dtype=torch.uint8)  # a fresh 64 MiB tensor, as each table chunk allocates
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(THP_MODE != "madvise", reason=f"transparent huge pages are '{THP_MODE}', not 'madvise'")
@pytest.mark.parametrize("setup, huge", [
    ("import precompile.cli", False),  # the library leaves the process's allocator alone
    ("import precompile.cli\nfrom precompile.io.process_memory import use_huge_pages\nuse_huge_pages()", True),
])
def test_the_program_alone_backs_large_tensors_with_huge_pages(setup, huge):
    """The order `run` has: everything imported, then the tuning, then the first tensor. A fresh 64 MiB
    tensor faults in 16384 pages of 4 KiB, or 32 of 2 MiB; it fails if an import ever allocates a
    tensor (torch reads its setting at the first allocation)."""
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    r = subprocess.run([sys.executable, "-c", FAULTS.format(setup=setup)], capture_output=True, text=True,
                       cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    faults = int(r.stdout.split()[-1])
    assert (faults < 4096) if huge else (faults >= 16384)


@pytest.mark.parametrize("status", [0, 2])
def test_run_keeps_the_exit_status_and_spares_the_final_collection(monkeypatch, status):
    """`run` is the program: main's exit status passes through, and what is alive at exit is frozen,
    so interpreter teardown does not search torch's objects for cycles."""
    from precompile import cli

    def fake_main():
        sys.exit(status)

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(cli, "use_huge_pages", lambda: None)  # the test process's environment stays as it is
    try:
        with pytest.raises(SystemExit) as e:
            cli.run()
        assert e.value.code == status
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
