"""File safety shared by every command: what may be read, where paths may point, who may write OUT_DIR.

The bottom of the import graph (stdlib and `errors` only), so that reading config.json, a shard,
a prompts file or a zoo, and writing OUT_DIR, all refuse the same things the same way:
- only regular files are opened for reading (a FIFO would block forever, a device never ends);
- JSON that is too deep for the parser, or not UTF-8, is one line naming the file;
- a relative path from a checkpoint (an index's weight_map) must stay inside its directory;
- a file's sha256 is read from its hub blob's name when it has one (`file_sha256`), and files
  that enter OUT_DIR unchanged are cloned, copied or linked with their hash (`share_file`);
- OUT_DIR appears complete or not at all (`atomic_dir`), after a free-space check
  (`check_free_space`); private working files live in a `scratch_dir` that every exit removes;
- one process at a time writes an OUT_DIR (`out_dir_lock`), and temporary directories that a
  killed run left behind are removed by the next one (`remove_stale_temps`);
- an OSError while writing becomes one line naming the file and the cause (`write_error`);
- SIGINT/SIGTERM are recorded process-wide (`interrupted`), so no commit follows a swallowed one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from precompile.errors import UserError

TMP_PREFIX = ".precompile-tmp-"
LOCK_PREFIX = ".precompile-lock-"
_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}

_received: list[int] = []  # signals delivered to this process (see `interrupted`)


# ---------------------------------------------------------------------------------------------- reading


def check_regular(path: str | os.PathLike, what: str = "") -> None:
    """Refuse anything but a regular file (after following symlinks) before it is opened for reading.

    A missing file is left to the caller (each names its own fix); a FIFO, socket, device or
    directory is refused here, so that nothing ever blocks on open() or reads without end.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"{what}{path} cannot be read ({e.strerror}); check the file and its permissions") from None
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise UserError(f"{what}{path} is {kind}, not a regular file; replace it with the real file")


def read_json(path: str | os.PathLike, fix: str = "fix or re-download it") -> Any:
    """Parse a JSON file; a non-regular, unreadable, non-UTF-8, invalid or too deeply nested file is one
    UserError naming it. FileNotFoundError passes through (callers say what is missing and why)."""
    check_regular(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
        return json.loads(text)
    except FileNotFoundError:
        raise
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be parsed; it is not a real model file, {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({str(e)[:200]}); {fix}") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); check the file and its permissions") from None


def source_boundary(root: Path) -> Path:
    """The directory whose contents count as SOURCE's own: a hub snapshot's files are links into the
    repo's `blobs/` folder, so for `<repo>/snapshots/<rev>` it is `<repo>`."""
    root = Path(os.path.realpath(root))
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return root.parent.parent
    return root


def check_inside(root: Path, name: str, what: str) -> None:
    """Refuse a checkpoint-relative file name that is absolute, or that leaves SOURCE (by `..` or by a
    symlink): its header or bytes would be read, or copied into OUT_DIR, from elsewhere."""
    boundary = source_boundary(root)
    p = Path(name)
    target = Path(os.path.realpath(Path(root) / name))
    if p.is_absolute() or ".." in p.parts or (target != boundary and boundary not in target.parents):
        raise UserError(f"{what} {name!r} points outside the checkpoint {root} (to {target}); a checkpoint's "
                        f"files must lie inside it, fix the file or the link")


def check_report_path(path: str | os.PathLike, flag: str, protected: Path | None = None) -> None:
    """Refuse, before any work, a report path that cannot be written or that lies inside `protected`
    (a converted OUT_DIR, whose files a report would replace or add to)."""
    p = Path(os.path.abspath(path))
    parent = Path(os.path.realpath(p.parent))
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: directory {p.parent} does not exist; create it or choose another path")
    if p.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: directory {p.parent} is not writable; choose another path")
    if protected is not None:
        guard = Path(os.path.realpath(protected))
        real = Path(os.path.realpath(p))
        if real == guard or guard in real.parents:
            raise UserError(f"{flag} {path} is inside {protected}, whose files it would replace or add to; write "
                            f"the report elsewhere")


def write_report(path: str | os.PathLike, text: str, flag: str) -> None:
    """Write a report file (already checked by `check_report_path`); an OSError is one line."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {flag} {path} ({e.strerror or e}); choose a writable path") from None


# ---------------------------------------------------------------------------------------------- hashing


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def blob_sha256(path: Path) -> str | None:
    """The sha256 of a hub cache file without reading it: its blob is named by it (None elsewhere)."""
    real = Path(os.path.realpath(path))
    if Path(path).is_symlink() and real.parent.name == "blobs" and _SHA256.match(real.name):
        return real.name
    return None


def file_sha256(path: Path) -> str:
    """sha256 of a file; a hub cache blob is named by its sha256, which saves reading it."""
    known = blob_sha256(path)
    if known:
        return known
    h = hashlib.sha256()
    with open(os.path.realpath(path), "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- OUT_DIR


@contextmanager
def atomic_dir(out_dir: Path, force: bool, log=None) -> Iterator[Path]:
    """Yield a temporary directory beside OUT_DIR; rename it into place only if the body succeeds.

    On any error, SIGINT or SIGTERM the temporary directory is removed and OUT_DIR is left as it was
    (absent, or the previous conversion when --force replaces it). OUT_DIR's lock is held throughout
    (see out_dir_lock); without --force the final rename replaces nothing but an empty OUT_DIR,
    so a directory someone else filled meanwhile is kept. An OSError while writing is one line.
    """
    out_dir = out_dir_target(out_dir)
    parent = out_dir.parent
    check_out_dir(out_dir, force)
    mark = signals_seen()
    with out_dir_lock(out_dir, log):
        tmp = parent / f"{TMP_PREFIX}{out_dir.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
        except OSError as e:
            raise UserError(f"cannot create {tmp} ({e.strerror}); choose a writable OUT_DIR") from None
        trap = _Trap()
        try:
            try:
                yield tmp
            except OSError as e:
                raise write_error(e, out_dir) from None
            with signals_deferred():  # a signal between the two renames would leave no OUT_DIR at all
                if interrupted(mark):  # one a library swallowed, or one held back by this block: never commit
                    raise KeyboardInterrupt("interrupted before the final rename")
                _commit(tmp, out_dir, force)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            trap.reraise(e)
            raise
        finally:
            trap.restore()


def _commit(tmp: Path, out_dir: Path, force: bool) -> None:
    """Rename tmp to OUT_DIR. Without force, rename(2) itself refuses anything but an empty directory, so
    nothing another process put there meanwhile is removed; with force the old OUT_DIR goes only once
    the new one is in place."""
    if force and (out_dir.exists() or out_dir.is_symlink()):
        old = out_dir.parent / f"{TMP_PREFIX}{out_dir.name}-{os.getpid()}-old"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        remove_tree(old)
        return
    try:
        os.rename(tmp, out_dir)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise UserError(f"OUT_DIR {out_dir} was created or filled by another program while this conversion ran; "
                        f"it was left untouched and this conversion discarded: pass --force to replace it, or "
                        f"choose another OUT_DIR") from None


def check_out_dir(out_dir: Path, force: bool) -> Path:
    """Refuse an OUT_DIR that cannot be (re)placed, creating nothing; returns its nearest existing ancestor.

    Called before any work, so a bad OUT_DIR fails in a second, not after the table is computed.
    """
    out_dir = out_dir_target(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"OUT_DIR {out_dir} is a file; choose a directory path")
        if any(out_dir.iterdir()) and not force:
            raise UserError(f"OUT_DIR {out_dir} exists and is not empty; pass --force to replace it")
    above = nearest_existing(out_dir.parent)
    if not above.is_dir():
        raise UserError(f"cannot create OUT_DIR {out_dir}: {above} is a file, not a directory; "
                        f"choose a writable OUT_DIR")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{above} is not writable; choose a writable OUT_DIR")
    return above


def check_free_space(where: Path, need: int, what: str = "the output") -> None:
    """Fail before any work when the filesystem that holds (or will hold) `where` has less free space than
    `need` bytes."""
    where = nearest_existing(where)
    free = shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"not enough disk space in {where}: {what} needs {need:,} bytes ({need / 2**30:.2f} GiB), "
                        f"{free:,} bytes ({free / 2**30:.2f} GiB) are free; free some space or choose "
                        f"another OUT_DIR")


@contextmanager
def scratch_dir(path: Path) -> Iterator[Path]:
    """A private working directory (e.g. a pickle checkpoint rewritten as safetensors), removed on exit,
    on any error, on SIGINT and on SIGTERM."""
    trap = _Trap()
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


def out_dir_target(out_dir: str | os.PathLike) -> Path:
    """OUT_DIR as an absolute path, through a symlink to a directory (which then keeps pointing at the new
    output); a dangling symlink is refused, since writing through it would create its target elsewhere."""
    out = Path(os.path.abspath(out_dir))
    if out.is_symlink():
        real = Path(os.path.realpath(out))
        if not real.exists():
            raise UserError(f"OUT_DIR {out} is a symlink to {real}, which does not exist; remove the link or "
                            f"choose another OUT_DIR")
        return real
    return out


_held: dict[Path, int] = {}  # lock path -> depth, for the locks this process holds


@contextmanager
def out_dir_lock(out_dir: Path, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `.precompile-lock-<name>` beside OUT_DIR (fcntl.flock, exclusive, not waiting) while OUT_DIR is
    written; a second writer is refused with the first one's pid. Once it is held, temporary
    directories of dead runs are removed (`remove_stale_temps`, reported through `log`). Re-entrant
    within a process; the lock file and any parent directories made for it are removed afterwards."""
    import fcntl

    out_dir = Path(out_dir)
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
                    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
                    raise UserError(f"the lock file {lock} is {kind}, not a regular file; remove it (precompile "
                                    f"makes it anew) and run again")
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


def remove_stale_temps(out_dir: Path, log: Callable[[str], None]) -> None:
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


def nearest_existing(path: Path) -> Path:
    """`path`, or the deepest of its ancestors that exists: where a directory about to be made will live."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def missing_ancestors(path: Path) -> list[Path]:
    """The directories above `path` that do not exist yet, deepest first (what a failed run must remove)."""
    return [a for a in Path(path).absolute().parents if not a.exists()]


def remove_empty(dirs: list[Path]) -> None:
    """Remove directories this run created, deepest first, stopping at the first that is not empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def remove_tree(path: Path) -> None:
    """Remove a directory tree, or the link itself when `path` is a symlink (never what it points to)."""
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


_WRITE_HINTS = {errno.ENOSPC: "the disk is full: free some space or choose another OUT_DIR",
                errno.EDQUOT: "the disk quota is exhausted: free some space or choose another OUT_DIR",
                errno.EFBIG: "the file is larger than the file-size limit (ulimit -f) or the filesystem allows: "
                             "raise the limit or choose another filesystem",
                errno.EROFS: "the filesystem is read-only: choose a writable OUT_DIR"}


def write_error(e: OSError, out_dir: Path) -> UserError:
    """One line for an OSError raised while OUT_DIR was being written: the file, the cause, the fix."""
    where = e.filename or out_dir
    hint = _WRITE_HINTS.get(e.errno, "check the disk and OUT_DIR, then run again")
    return UserError(f"writing {out_dir} failed at {where}: {e.strerror or e} ({errno.errorcode.get(e.errno, '?')}); "
                     f"{hint}")


# ---------------------------------------------------------------------------------------------- copying


BLOCK = 8 << 20  # bytes read at a time when copying through a hash


def copy_range(src, dst, start: int, length: int) -> None:
    """Copy bytes [start, start+length) of src to dst's current position without a user-space buffer."""
    dst.flush()
    out_fd, in_fd = dst.fileno(), src.fileno()
    pos = os.lseek(out_fd, 0, os.SEEK_CUR)
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(in_fd, out_fd, length - done, start + done, pos + done)
            if n == 0:
                break
            done += n
    except OSError:
        pass
    os.lseek(out_fd, pos + done, os.SEEK_SET)
    if done < length:  # filesystems without copy_file_range, or a short copy: finish in 16 MiB blocks
        src.seek(start + done)
        while done < length:
            buf = src.read(min(16 << 20, length - done))
            if not buf:
                raise UserError(f"{src.name}: unexpected end of file; the file is truncated, re-download it")
            dst.write(buf)
            done += len(buf)



def copy_hashed(fin, fout, ranges: list[tuple[int, int]], out_digest, src_digest=None) -> None:
    """Copy the byte ranges [start, stop) of fin (sorted, disjoint) to fout, hashing what is written.

    With src_digest, the whole of fin is read once, in order, and hashed too: one read serves the
    source's sha256 and the output's, which the manifest records both.
    """
    spans = [(0, os.fstat(fin.fileno()).st_size)] if src_digest is not None else ranges
    buf = memoryview(bytearray(BLOCK))
    i = 0
    for start, stop in spans:
        fin.seek(start)
        pos = start
        while pos < stop:
            n = fin.readinto(buf[: min(BLOCK, stop - pos)])
            if not n:
                raise UserError(f"{fin.name}: unexpected end of file; the file is truncated, re-download it")
            if src_digest is not None:
                src_digest.update(buf[:n])
            while i < len(ranges) and ranges[i][1] <= pos:
                i += 1
            j = i
            while j < len(ranges) and ranges[j][0] < pos + n:  # the parts of this block that are kept
                part = buf[max(ranges[j][0], pos) - pos: min(ranges[j][1], pos + n) - pos]
                fout.write(part)
                out_digest.update(part)
                j += 1
            pos += n


def share_file(src: Path, dst: Path, mode: str) -> tuple[str, str]:
    """Place an unchanged file in OUT_DIR: reflink when possible, else copy (hardlink only when asked).

    Returns the method used and the file's sha256, found the cheapest way: a hub blob's name, else
    hashed while copying (one read), else read once after a clone or link (which read nothing).
    A hard link shares the inode: editing OUT_DIR then edits the source.
    """
    known = blob_sha256(src)
    src = Path(os.path.realpath(src))
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return "hardlink", known or file_sha256(src)
        except OSError as e:
            raise UserError(f"cannot hard-link {src} into {dst.parent} ({e.strerror}); they must be on one "
                            f"filesystem, or use --link copy") from None
    if mode in ("auto", "reflink"):
        try:
            import fcntl

            with open(src, "rb") as fin, open(dst, "wb") as fout:
                fcntl.ioctl(fout.fileno(), 0x40049409, fin.fileno())  # FICLONE
            return "reflink", known or file_sha256(src)
        except (OSError, ImportError) as e:
            if mode == "reflink":
                dst.unlink(missing_ok=True)
                raise UserError(f"cannot reflink {src} ({getattr(e, 'strerror', e)}): the filesystem does not "
                                f"support copy-on-write clones; use --link auto or copy") from None
            dst.unlink(missing_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        if known:  # nothing to hash: the kernel copies without a user-space buffer
            copy_range(fin, fout, 0, size)
            return "copy", known
        digest = hashlib.sha256()
        copy_hashed(fin, fout, [(0, size)], digest)
    return "copy", digest.hexdigest()


def write_json(path: Path, data: dict) -> None:
    """JSON as this project writes it everywhere: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- signals


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


class _Trap:
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


_program: list[bool] = []  # set once the program (cli.run) handles the signals itself


def in_program() -> bool:
    """Whether the program (cli.run) handles SIGINT/SIGTERM in this process (not a library caller's)."""
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
