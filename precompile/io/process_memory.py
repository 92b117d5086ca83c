"""This process's memory: the tuning the `precompile` program applies to itself, and the figures /proc reports.

The tuning changes the whole process, so only the program applies it: the console entry point
(`precompile.cli.run`) calls `use_huge_pages` and `skip_exit_collection`, and `heap_kept` acts only
while the program runs (`signals.in_program`, the one program-mode flag); the library API, and a
Python user who imports it, never get it. `proc_bytes` reads what the kernel says was used (batch's
and bench's peak memory figures).
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from precompile.io.signals import in_program

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> None:
    """Have torch back its large CPU tensors with transparent huge pages (its THP_MEM_ALLOC_ENABLE).

    Each table chunk allocates a few fresh tensors of tens of MiB, and each allocation is mapped
    afresh: with 4 KiB pages that is 16384 page faults per 64 MiB, with 2 MiB pages 32
    (benchmarks/bench_process.py measures what that saves). Memory is unchanged: tensors are still
    handed back when freed.
    torch reads the variable once, at its first CPU allocation, which importing precompile does not
    make (tests/io/test_process.py checks it); a value the user set is kept. No effect where the
    kernel's THP mode is `never`.
    """
    os.environ.setdefault(THP_ENV, "1")


def skip_exit_collection() -> None:
    """Spare the interpreter's final garbage collection of every object torch created (a noticeable
    part of a short command). Objects are still released, atexit handlers run and files are flushed;
    only the cycle search over objects that live to the end of the process is skipped."""
    gc.freeze()


# glibc's mallopt parameters, and the values its dynamic thresholds grow to (64-bit)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_MAX, KEPT = 32 << 20, 1 << 30


@contextmanager
def heap_kept() -> Iterator[None]:
    """While the table is computed, memory one chunk frees stays with the process for the next chunk.

    Each chunk allocates the same temporaries (tens of MiB each). glibc serves blocks that large by
    mmap and unmaps them when freed, or trims the heap under them, so every chunk faults fresh zeroed
    pages in (huge pages cut the count of faults, not the zeroing): the system time was a third of the
    table's. Blocks under MMAP_MAX (the largest mmap threshold glibc grows to) now come from a heap
    that is not trimmed, so they are reused; larger ones are still mapped afresh, where huge pages
    make each fault cover 2 MiB. Keeping those too in the heap saved no time that could be measured,
    and the heap, cut into blocks of a Pythia-shaped chunk's many sizes (64-192 MiB), grew with each
    chunk (1.4-1.5 GiB after 3 chunks, against 0.8 GiB mapped afresh). On the way out the thresholds are the
    ones glibc would have grown to and what was kept is given back.
    Only in the `precompile` program (`in_program`), and only with glibc.
    """
    try:
        libc = ctypes.CDLL(None) if in_program() else None
        mallopt, trim = (libc.mallopt, libc.malloc_trim) if libc is not None else (None, None)
    except (OSError, AttributeError):
        mallopt = trim = None
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_MAX)
    mallopt(M_TRIM_THRESHOLD, KEPT)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, MMAP_MAX)
        mallopt(M_TRIM_THRESHOLD, 2 * MMAP_MAX)
        trim(0)


def proc_bytes(path: str, field: str) -> int | None:
    """The `field:  N kB` line of a /proc status file (/proc/meminfo, /proc/self/status), in bytes (None where
    it cannot be read: other systems)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
