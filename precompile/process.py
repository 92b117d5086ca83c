"""Process-wide tuning that the `precompile` program applies to itself.

Only the console entry point (`precompile.cli.run`) calls these: they change the whole process,
so the library API, and a Python user who imports it, never get them.
"""

from __future__ import annotations

import gc
import os

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> None:
    """Have torch back its large CPU tensors with transparent huge pages (its THP_MEM_ALLOC_ENABLE).

    Each table chunk allocates a few fresh tensors of tens of MiB, and each allocation is mapped
    afresh: with 4 KiB pages that is 16384 page faults per 64 MiB, with 2 MiB pages 32
    (benchmarks/bench_process.py measures what that saves). Memory is unchanged: tensors are still
    handed back when freed.
    torch reads the variable once, at its first CPU allocation, which importing precompile does not
    make (tests/test_process.py checks it); a value the user set is kept. No effect where the
    kernel's THP mode is `never`.
    """
    os.environ.setdefault(THP_ENV, "1")


def skip_exit_collection() -> None:
    """Spare the interpreter's final garbage collection of every object torch created (a noticeable
    part of a short command). Objects are still released, atexit handlers run and files are flushed;
    only the cycle search over objects that live to the end of the process is skipped."""
    gc.freeze()
