"""A file's sha256, found the cheapest way, and copies that hash what they write.

The manifest records the sha256 of every source and output file, so each byte should be read at most
once: a hub cache file's hash is its blob's name (`blob_sha256`), a rewritten shard is hashed while it
is copied (`copy_hashed`, which can hash the whole source in the same read), and a file that enters
OUT_DIR unchanged is cloned, copied or linked with its hash (`share_file`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from precompile.errors import UserError

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
