"""Writing OUT_DIR: streamed table, rewritten or shared shards, index, and an atomic rename at the end.

Nothing here holds a whole checkpoint or the whole table in memory: the table is
streamed chunk by chunk after its header, untouched tensors are copied as byte
ranges, and shards without eliminated tensors are cloned or copied whole.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import queue
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .errors import UserError
from .files import (TMP_PREFIX, interrupted, missing_ancestors, out_dir_lock, out_dir_target, record_signal,
                    remove_empty, remove_tree, signals_seen, write_error)
from .source import blob_sha256, file_sha256
from .tensors import DTYPE_NAMES, DTYPES, FLOAT_DTYPES, TensorInfo, copy_range, element_size, write_header

BLOCK = 8 << 20  # bytes read at a time when copying through a hash


def write_table(path: Path, name: str, shape: tuple[int, int], dtype: torch.dtype,
                chunks: Iterable[torch.Tensor], pending: int = 2, *,
                extra: Sequence[tuple[str, str, tuple[int, ...], int]] = (),
                metadata: dict[str, str] | None = None) -> str:
    """Stream a [vocab, W] tensor: header first, then each chunk's rows as they are computed.

    `extra` header entries (name, dtype, shape, nbytes) follow the table, written as zeros: markers
    such as the layout's guard, never data. Returns the file's sha256, hashed on the way out so the
    table is never read back.

    A background thread writes chunk k while the caller's iterator computes chunk k+1. At most
    `pending` chunks wait in between, so at most pending + 2 chunks are ever alive (the one being
    computed, the waiting ones, the one being written): memory does not grow with the vocabulary.
    """
    row_bytes = shape[1] * torch.empty((), dtype=dtype).element_size()
    waiting: queue.Queue = queue.Queue(maxsize=max(1, pending))
    failed: list[BaseException] = []
    digest = hashlib.sha256()

    def drain(f) -> None:
        while True:
            item = waiting.get()
            if item is None:
                return
            if not failed:
                try:
                    _write_tensor(f, item, digest)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    failed.append(e)
            del item

    with open(path, "wb") as f:
        write_header(f, [(name, DTYPE_NAMES[dtype], shape, shape[0] * row_bytes), *extra],
                     metadata or {"format": "pt"})
        f.flush()
        with open(path, "rb") as head:
            digest.update(head.read())
        writer = threading.Thread(target=drain, args=(f,), name="precompile-table-writer", daemon=True)
        writer.start()
        rows = 0
        try:
            for chunk in chunks:
                if failed:
                    break
                if chunk.dim() != 2 or chunk.shape[1] != shape[1]:
                    raise RuntimeError(f"table chunk has shape {tuple(chunk.shape)}, expected [*, {shape[1]}]")
                rows += chunk.shape[0]
                waiting.put(chunk.to(device="cpu", dtype=dtype))
                del chunk  # drop this frame's reference: only the queue and the writer hold it now
        finally:
            waiting.put(None)
            writer.join()
    if failed:
        raise failed[0]
    if rows != shape[0]:
        raise RuntimeError(f"table stream wrote {rows} rows, expected {shape[0]}")
    with open(path, "ab") as f:
        for entry in extra:
            zeros = bytes(entry[3])
            f.write(zeros)
            digest.update(zeros)
    return digest.hexdigest()


def _write_tensor(f, t: torch.Tensor, digest=None) -> None:
    """Write a CPU tensor's raw bytes without an intermediate bytes copy."""
    if t.numel():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        f.write(raw)
        if digest is not None:
            digest.update(raw)


def _convert_range(fin, fout, t: TensorInfo, target: torch.dtype, digest, block: int = 16 << 20) -> None:
    """Write tensor t of fin converted to `target`, `block` bytes at a time (never the whole tensor)."""
    src = DTYPES[t.dtype]
    step = max(1, block // element_size(t.dtype)) * element_size(t.dtype)
    fin.seek(t.start)
    done = 0
    while done < t.nbytes:
        buf = bytearray(min(step, t.nbytes - done))
        if fin.readinto(buf) != len(buf):
            raise UserError(f"{fin.name}: unexpected end of file; the file is truncated, re-download it")
        _write_tensor(fout, torch.frombuffer(buf, dtype=src).to(target), digest)
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


def write_shard(src: Path, dst: Path, keep: list[TensorInfo], metadata: dict[str, str],
                out_dtype: str | None, src_digest=None) -> str:
    """Write `keep` from src into a new safetensors file, in their original order; returns its sha256.

    The output is hashed as it is written, never read back. Tensors keep their bytes unless
    out_dtype asks for a float conversion, which is streamed in blocks. With src_digest (a
    hashlib object) src is hashed too, in the same read when no tensor changes dtype.
    """
    keep = sorted(keep, key=lambda t: t.start)

    def target(t: TensorInfo) -> str:
        return out_dtype if (out_dtype and t.dtype in FLOAT_DTYPES) else t.dtype

    entries = [(t.name, target(t), t.shape, t.numel * element_size(target(t))) for t in keep]
    digest = hashlib.sha256()
    head = io.BytesIO()
    write_header(head, entries, metadata)
    same = all(target(t) == t.dtype for t in keep)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(head.getvalue())
        digest.update(head.getvalue())
        if same:
            copy_hashed(fin, fout, [(t.start, t.start + t.nbytes) for t in keep], digest, src_digest)
            return digest.hexdigest()
        for t in keep:
            if target(t) == t.dtype:
                copy_hashed(fin, fout, [(t.start, t.start + t.nbytes)], digest)
            else:
                _convert_range(fin, fout, t, DTYPES[target(t)], digest)
        if src_digest is not None:
            copy_hashed(fin, fout, [], digest, src_digest)  # hashes src, writes nothing
    return digest.hexdigest()


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


@contextmanager
def atomic_dir(out_dir: Path, force: bool, log=None) -> Iterator[Path]:
    """Yield a temporary directory beside OUT_DIR; rename it into place only if the body succeeds.

    On any error, SIGINT or SIGTERM the temporary directory is removed and OUT_DIR is left as it was
    (absent, or the previous conversion when --force replaces it). OUT_DIR's lock is held throughout
    (see files.out_dir_lock); without --force the final rename replaces nothing but an empty OUT_DIR,
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
    above = out_dir.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise UserError(f"cannot create OUT_DIR {out_dir}: {above} is a file, not a directory; "
                        f"choose a writable OUT_DIR")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{above} is not writable; choose a writable OUT_DIR")
    return above


def check_free_space(where: Path, need: int, what: str = "the output") -> None:
    """Fail before any work when the filesystem holding `where` has less free space than `need` bytes."""
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
