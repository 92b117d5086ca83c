"""OUT_DIR's one owner: where it is, whether it may be (re)placed, who writes it, and its all-or-nothing commit.

`OutDir.resolve` turns the user's path into the directory written (through a symlink to a directory);
`check` refuses, before any work, an OUT_DIR that cannot be (re)placed, and `check_space` one whose
filesystem is too small; `lock` lets one process at a time write it and removes what killed runs left
beside it; `scratch` is a private working directory beside it; `write` yields a temporary directory and
renames it into place only if everything succeeded, with no SIGINT or SIGTERM seen. The re-checks are
deliberate: `write` resolves and checks OUT_DIR again, since minutes of work separate it from the first
check and another program may have created, filled or replaced OUT_DIR meanwhile.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from precompile.errors import UserError
from precompile.io.file_safety import (
    check_free_space, file_kind, missing_ancestors, nearest_existing, remove_empty, remove_tree, write_error)
from precompile.io.signals import SignalTrap, interrupted, signals_deferred, signals_seen

TMP_PREFIX = ".precompile-tmp-"
LOCK_PREFIX = ".precompile-lock-"

Log = Callable[[str], None]
_held: dict[Path, int] = {}  # lock path -> depth, for the locks this process holds (OutDir.lock)


@dataclass(frozen=True)
class OutDir:
    """OUT_DIR, resolved: `path` is absolute, and the real directory when the user's path is a symlink to one.
    force: an existing, non-empty OUT_DIR may be replaced (only once the new one is complete)."""

    path: Path
    force: bool = False

    @classmethod
    def resolve(cls, out_dir: str | os.PathLike, force: bool = False) -> OutDir:
        """OUT_DIR as an absolute path, through a symlink to a directory (which then keeps pointing at the new
        output); a dangling symlink is refused, since writing through it would create its target elsewhere."""
        out = Path(os.path.abspath(out_dir))
        if out.is_symlink():
            real = Path(os.path.realpath(out))
            if not real.exists():
                raise UserError(f"OUT_DIR {out} is a symlink to {real}, which does not exist; remove the link or "
                                f"choose another OUT_DIR")
            return cls(real, force)
        return cls(out, force)

    def check(self) -> Path:
        """Refuse an OUT_DIR that cannot be (re)placed, creating nothing; returns its nearest existing ancestor.

        Called before any work, so a bad OUT_DIR fails in a second, not after the table is computed.
        """
        out_dir = OutDir.resolve(self.path).path
        if out_dir.exists():
            if not out_dir.is_dir():
                raise UserError(f"OUT_DIR {out_dir} is a file; choose a directory path")
            if any(out_dir.iterdir()) and not self.force:
                raise UserError(f"OUT_DIR {out_dir} exists and is not empty; pass --force to replace it")
        above = nearest_existing(out_dir.parent)
        if not above.is_dir():
            raise UserError(f"cannot create OUT_DIR {out_dir}: {above} is a file, not a directory; "
                            f"choose a writable OUT_DIR")
        if not os.access(above, os.W_OK | os.X_OK):
            raise UserError(f"{above} is not writable; choose a writable OUT_DIR")
        return above

    def check_space(self, need: int, what: str) -> None:
        """`check` again (planning took a while), then fail before any work when OUT_DIR's filesystem has
        less than `need` bytes free."""
        check_free_space(self.check(), need, what)

    def temp(self, suffix: str = "") -> Path:
        """`.precompile-tmp-<name>-<pid>[-suffix]` beside OUT_DIR: the names `remove_stale_temps` knows."""
        return self.path.parent / f"{TMP_PREFIX}{self.path.name}-{os.getpid()}{suffix}"

    def scratch(self) -> AbstractContextManager[Path]:
        """A private working directory beside OUT_DIR (on its filesystem), removed on every exit."""
        return scratch_dir(self.temp("-source"))

    @contextmanager
    def lock(self, log: Log | None = None) -> Iterator[None]:
        """Hold `.precompile-lock-<name>` beside OUT_DIR (fcntl.flock, exclusive, not waiting) while OUT_DIR is
        written; a second writer is refused with the first one's pid. Once it is held, temporary
        directories of dead runs are removed (`remove_stale_temps`, reported through `log`). Re-entrant
        within a process; the lock file and any parent directories made for it are removed afterwards."""
        import fcntl

        out_dir = self.path
        lock = out_dir.parent / f"{LOCK_PREFIX}{out_dir.name}"
        if lock in _held:
            _held[lock] += 1
            try:
                yield
            finally:
                _held[lock] -= 1
            return
        created = missing_ancestors(lock)
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            remove_empty(created)
            raise UserError(f"cannot create {lock.parent} ({e.strerror}); choose a writable OUT_DIR") from None
        fd = -1
        try:
            while True:
                try:
                    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
                    mode = os.fstat(fd).st_mode
                    if not stat.S_ISREG(mode):  # a FIFO or device put there: flock/ftruncate would fail on it
                        raise UserError(f"the lock file {lock} is {file_kind(mode)}, not a regular file; remove it "
                                        f"(precompile makes it anew) and run again")
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UserError(f"another precompile process ({_lock_owner(fd)}) is writing OUT_DIR {out_dir}; "
                                    f"wait for it to finish or choose another OUT_DIR") from None
                except OSError as e:
                    raise UserError(f"cannot lock {lock} ({e.strerror}); choose a writable OUT_DIR") from None
                try:  # the previous holder may have removed the file between our open and our flock
                    same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
                fd = -1
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _held[lock] = 1
            remove_stale_temps(out_dir, log or (lambda line: None))
            try:
                yield
            finally:
                del _held[lock]
                try:
                    os.unlink(lock)
                except OSError:
                    pass
        finally:
            if fd >= 0:
                os.close(fd)
            remove_empty(created)

    @contextmanager
    def write(self, log: Log | None = None) -> Iterator[Path]:
        """Yield a temporary directory beside OUT_DIR; rename it into place only if the body succeeds.

        On any error, SIGINT or SIGTERM the temporary directory is removed and OUT_DIR is left as it was
        (absent, or the previous conversion when --force replaces it). OUT_DIR's lock is held throughout
        (see `lock`); without --force the final rename replaces nothing but an empty OUT_DIR, so a
        directory someone else filled meanwhile is kept. An OSError while writing is one line.
        """
        out = OutDir.resolve(self.path, self.force)  # again: the link may have changed since
        out.check()
        mark = signals_seen()
        with out.lock(log):
            tmp = out.temp()
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir()
            except OSError as e:
                raise UserError(f"cannot create {tmp} ({e.strerror}); choose a writable OUT_DIR") from None
            trap = SignalTrap()
            try:
                try:
                    yield tmp
                except OSError as e:
                    raise write_error(e, out.path) from None
                with signals_deferred():  # a signal between the two renames would leave no OUT_DIR at all
                    if interrupted(mark):  # one a library swallowed, or one held back by this block: never commit
                        raise KeyboardInterrupt("interrupted before the final rename")
                    out._commit(tmp)
            except BaseException as e:
                shutil.rmtree(tmp, ignore_errors=True)
                trap.reraise(e)
                raise
            finally:
                trap.restore()

    def _commit(self, tmp: Path) -> None:
        """Rename tmp to OUT_DIR. Without force, rename(2) itself refuses anything but an empty directory, so
        nothing another process put there meanwhile is removed; with force the old OUT_DIR goes only once
        the new one is in place."""
        out_dir = self.path
        if self.force and (out_dir.exists() or out_dir.is_symlink()):
            old = self.temp("-old")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            remove_tree(old)
            return
        try:
            os.rename(tmp, out_dir)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            raise UserError(f"OUT_DIR {out_dir} was created or filled by another program while this conversion "
                            f"ran; it was left untouched and this conversion discarded: pass --force to replace it, "
                            f"or choose another OUT_DIR") from None


@contextmanager
def scratch_dir(path: Path) -> Iterator[Path]:
    """A private working directory (e.g. a pickle checkpoint rewritten as safetensors), removed on exit,
    on any error, on SIGINT and on SIGTERM."""
    trap = SignalTrap()
    created = missing_ancestors(path)
    try:
        yield Path(path)
    except BaseException as e:
        shutil.rmtree(path, ignore_errors=True)
        remove_empty(created)
        trap.reraise(e)
        if isinstance(e, OSError):
            raise write_error(e, Path(path)) from None
        raise
    finally:
        shutil.rmtree(path, ignore_errors=True)
        trap.restore()


# ---------------------------------------------------------------------------------------------- the lock's helpers


def _lock_owner(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out_dir: Path, log: Log) -> None:
    """Remove `.precompile-tmp-<name>-<pid>[-suffix]` directories beside OUT_DIR whose process is gone
    (a run killed by SIGKILL or a power cut cannot clean up after itself). Called with OUT_DIR's lock
    held, so no live run of ours writes them; a live pid (another user's, or reused) is left alone."""
    out_dir = Path(out_dir)
    pattern = re.compile(re.escape(f"{TMP_PREFIX}{out_dir.name}-") + r"(\d+)(-[a-z]+)?$")
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
        log(f"removed {p}, left by an earlier run (pid {m.group(1)}) that no longer exists")
