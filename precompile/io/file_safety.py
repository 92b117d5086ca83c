"""What may be read and where paths may point, and the one-line errors of reading and writing files.

Stdlib and `errors` only, at the bottom of the import graph, so that reading config.json, a shard, a
prompts file or a zoo, and writing OUT_DIR or a report, all refuse the same things the same way:
- only regular files are opened for reading (a FIFO would block forever, a device never ends);
- JSON that is too deep for the parser, or not UTF-8, is one line naming the file;
- a relative path from a checkpoint (an index's weight_map) must stay inside its directory;
- a report path is checked before any work, and never lies inside a converted OUT_DIR;
- a write that would not fit fails before any work (`check_free_space`), and an OSError while writing
  is one line naming the file and the cause (`write_error`);
- what a failed run created is removed (`missing_ancestors`, `remove_empty`, `remove_tree`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from precompile.errors import UserError

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory"}


def file_kind(mode: int) -> str:
    """What a non-regular file is, from its st_mode, as the errors name it ("a FIFO (named pipe)", ...)."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


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
        kind = file_kind(mode)
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


def write_json(path: Path, data: dict) -> None:
    """JSON as this project writes it everywhere: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- writing


def check_free_space(where: Path, need: int, what: str = "the output") -> None:
    """Fail before any work when the filesystem that holds (or will hold) `where` has less free space than
    `need` bytes."""
    where = nearest_existing(where)
    free = shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"not enough disk space in {where}: {what} needs {need:,} bytes ({need / 2**30:.2f} GiB), "
                        f"{free:,} bytes ({free / 2**30:.2f} GiB) are free; free some space or choose "
                        f"another OUT_DIR")


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
