"""Progress output: a tqdm bar on a terminal, plain log lines in CI logs, nothing when quiet.

Every tick is also where the program notices an interrupt that a library swallowed (signals.raise_if_interrupted).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

from precompile.io.signals import raise_if_interrupted


class Progress:
    """One object carries the output mode through a run, so library code never prints on its own."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None, tty: bool | None = None):
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty

    def log(self, message: str) -> None:
        raise_if_interrupted()
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def bar(self, total: int, desc: str, unit: str = "it") -> Iterator["_Bar"]:
        if self.quiet:
            yield _Bar(None, None, total, desc, unit)
            return
        if self.tty:
            from tqdm import tqdm

            with tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True,
                      unit_scale=unit == "B") as t:
                yield _Bar(t, None, total, desc, unit)
            return
        b = _Bar(None, self, total, desc, unit)
        yield b
        b.finish()


class _Bar:
    def __init__(self, tqdm_bar, plain: Progress | None, total: int, desc: str, unit: str):
        self._t, self._plain, self.total, self.desc, self.unit = tqdm_bar, plain, total, desc, unit
        self.n = 0
        self._next_pct = 10
        self._start = time.monotonic()

    def update(self, n: int = 1) -> None:
        raise_if_interrupted()  # long work is where a swallowed interrupt must take effect
        self.n += n
        if self._t is not None:
            self._t.update(n)
        elif self._plain is not None and self.total:
            pct = 100 * self.n // self.total
            if pct >= self._next_pct and self.n < self.total:
                self._plain.log(f"{self.desc}: {self._count()} ({pct}%)")
                self._next_pct = (pct // 10 + 1) * 10

    def _count(self) -> str:
        if self.unit == "B":
            return f"{self.n / 2**20:.1f}/{self.total / 2**20:.1f} MiB"
        return f"{self.n}/{self.total} {self.unit}"

    def finish(self) -> None:
        if self._plain is not None:
            secs = time.monotonic() - self._start
            self._plain.log(f"{self.desc}: {self._count()} done in {secs:.1f}s")
