"""Writing checkpoint files: the streamed table and rewritten shards, hashed on the way out.

Nothing here holds a whole checkpoint or the whole table in memory: the table is streamed chunk
by chunk after its header, and kept tensors are copied as byte ranges (a dtype change is streamed
in blocks). Where those files go, and how OUT_DIR appears whole, is `hashed_copy`'s and `out_dir`'s job.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
from pathlib import Path
from typing import Iterable, Sequence

import torch

from precompile.errors import UserError
from precompile.io.hashed_copy import copy_hashed
from precompile.io.safetensors_files import DTYPE_NAMES, DTYPES, TensorInfo, element_size, output_dtype, write_header


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


def write_shard(src: Path, dst: Path, keep: list[TensorInfo], metadata: dict[str, str],
                out_dtype: str | None, src_digest=None) -> str:
    """Write `keep` from src into a new safetensors file, in their original order; returns its sha256.

    The output is hashed as it is written, never read back. Tensors keep their bytes unless
    out_dtype asks for a float conversion, which is streamed in blocks. With src_digest (a
    hashlib object) src is hashed too, in the same read when no tensor changes dtype.
    """
    keep = sorted(keep, key=lambda t: t.start)

    def target(t: TensorInfo) -> str:
        return output_dtype(t.dtype, out_dtype)

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


