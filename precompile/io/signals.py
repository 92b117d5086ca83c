"""SIGINT and SIGTERM, recorded process-wide, and whether this process is the `precompile` program.

A signal's KeyboardInterrupt can be swallowed by a library (or come out of a C extension's callback as an
unrelated error), so every signal is also recorded here: no commit of OUT_DIR follows one (`interrupted`),
and in the program the next progress tick stops the work (`raise_if_interrupted`). The program installs
its handler first thing (`install_interrupt_handler`), which also marks the process as the program
(`in_program`): the one flag that the process-wide tuning of `process_memory` reads too.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

_received: list[int] = []  # signals delivered to this process (see `interrupted`)
_program: list[bool] = []  # set while the program (cli.run) runs in this process and handles the signals itself


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (they are delivered afterwards)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class SignalTrap:
    """SIGINT and SIGTERM become KeyboardInterrupt while trapped, and are remembered.

    Remembering matters: a signal that lands inside a C extension's Python callback (safetensors
    reading a slice, for one) can come out as an unrelated ValueError. `reraise` turns any error
    that follows a trapped signal back into the interrupt it was.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received.append(signum)
        record_signal(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    def reraise(self, error: BaseException) -> None:
        if self.received and not isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(f"signal {self.received[-1]}") from error

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def record_signal(signum: int) -> None:
    _received.append(signum)


def in_program() -> bool:
    """Whether the program (cli.run) runs in this process and handles SIGINT/SIGTERM itself (not a library
    caller's): the one program-mode flag, set and cleared with the handler, and read by the process-wide
    tuning too (`process_memory.heap_kept`), so the two can never disagree about who owns the process."""
    return bool(_program)


def signals_seen() -> int:
    """A mark for `interrupted(since=...)`: how many SIGINT/SIGTERM this process has recorded, or 0 in the
    program, where any interrupt since start-up counts (one swallowed during planning must still stop the
    commit)."""
    return 0 if _program else len(_received)


def interrupted(since: int = 0) -> bool:
    """True once SIGINT or SIGTERM reached this process after the mark `since`, even when the
    KeyboardInterrupt it raised was swallowed by a library: a commit (OUT_DIR's final rename) must not
    follow. Signals held back by a block that defers them count too."""
    if len(_received) > since:
        return True
    if hasattr(signal, "sigpending"):  # e.g. held back by signals_deferred
        return bool(signal.sigpending() & {signal.SIGINT, signal.SIGTERM})
    return False


def raise_if_interrupted() -> None:
    """In the program, an interrupt that a library swallowed stops the work at its next progress tick
    (precompile.io.progress calls this) instead of at the final rename, minutes later."""
    if _program and _received:
        raise KeyboardInterrupt(f"signal {_received[-1]}")


def install_interrupt_handler() -> Callable[[], None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt and are recorded; installed first thing by the program,
    before any heavy import, so that an interrupt at any moment ends as `error: interrupted`. A
    KeyboardInterrupt that Python can only report as "Exception ignored" (raised inside a callback) is
    not printed: it is recorded, and the program still ends as interrupted. Returns the undo."""
    _received.clear()
    _program[:] = [True]
    previous_hook = sys.unraisablehook

    def quiet_interrupts(unraisable) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    def handler(signum, frame):
        record_signal(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    sys.unraisablehook = quiet_interrupts
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def undo() -> None:  # for a caller that runs the program inside its own process
        for sig, old in previous.items():
            signal.signal(sig, old)
        sys.unraisablehook = previous_hook
        _program.clear()

    return undo
