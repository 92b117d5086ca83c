"""Safetensors files read as data: headers, byte ranges and lazy row slices.

The converter never loads a whole checkpoint. It parses headers itself (so that
a bad file is named before any work starts), reads the few tensors layer 0
needs, slices embedding rows chunk by chunk, and copies untouched tensors as byte
ranges. The format is an 8-byte little-endian header length, a JSON header, and
raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from precompile.errors import UserError
from precompile.io.file_safety import check_free_space, check_inside, check_regular, read_json
from precompile.io.weight_file_names import (
    INDEX_NAME, PICKLE_INDEX, PICKLE_SUFFIXES, SINGLE_NAME, has_safetensors, weight_index)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
# Float dtypes by torch's name, as options, the manifest and config.json spell them (the loader keeps a copy).
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                        "float16": torch.float16, "float64": torch.float64}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # file name relative to the checkpoint directory
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the module ("bfloat16"), as TORCH_DTYPES and config.json spell it."""
    return str(dtype).removeprefix("torch.")


def output_dtype(stored: str, model: str | None) -> str:
    """The safetensors dtype a kept tensor is written in: a float tensor takes the model dtype (when one is
    asked for), any other keeps its own."""
    return model if model and stored in FLOAT_DTYPES else stored


def read_header(path: Path, name: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors header: every tensor must lie within the file.

    `name` is the file's path relative to its checkpoint (as the index names it, e.g. `sub/x.safetensors`),
    recorded in each TensorInfo; default: the bare file name.
    """
    check_regular(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: file is truncated (no safetensors header); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise UserError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes); "
                                f"the file is truncated or not safetensors, re-download it")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the file and its permissions") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"{path}: safetensors header is not valid JSON; the file is corrupt, re-download it") \
            from None
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise UserError(f"{path}: safetensors __metadata__ must map strings to strings; the file is corrupt")
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for tname, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (b, e, *info["shape"])):
                raise TypeError
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: JSON Infinity as a size
            raise UserError(f"{path}: tensor {tname} has a malformed header entry; the file is corrupt") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise UserError(f"{path}: tensor {tname} has unsupported dtype {dtype}")
        if any(s < 0 for s in shape):
            raise UserError(f"{path}: tensor {tname} has a negative dimension in shape {list(shape)}; the file is "
                            f"corrupt, re-download it")
        t = TensorInfo(tname, name or path.name, dtype, shape, base + int(b), base + int(e))
        if not (0 <= b <= e) or t.stop > size:
            raise UserError(f"{path}: tensor {tname} lies past the end of the file "
                            f"(bytes {t.start}-{t.stop} of {size}); the file is truncated, re-download it")
        if t.nbytes != t.numel * element_size(dtype):
            raise UserError(f"{path}: tensor {tname} has {t.nbytes} bytes for shape {list(shape)} {dtype}; "
                            f"the file is corrupt")
        out[tname] = t
    _check_contiguous(path, out, base, size)
    return out, meta


def _check_contiguous(path: Path, tensors: dict[str, TensorInfo], base: int, size: int) -> None:
    """Tensors must tile the data section exactly, as safetensors itself requires: no overlap, no gap, no tail."""
    pos = base
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.stop)):
        if t.start != pos:
            what = "overlaps another tensor" if t.start < pos else "leaves a gap before it"
            raise UserError(f"{path}: tensor {t.name} {what} (starts at byte {t.start}, expected {pos}); "
                            f"the file is corrupt, re-download it")
        pos = t.stop
    if pos != size:
        raise UserError(f"{path}: {size - pos} bytes after the last tensor (header covers {pos} of {size}); "
                        f"the file is corrupt or not safetensors, re-download it")


class Checkpoint:
    """A Hugging Face checkpoint directory: one model.safetensors or shards plus an index."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files: list[str] = checkpoint_files(self.root)
        # where the weights came from: the same files, unless they were rewritten from pickles (open_checkpoint)
        self.source_root: Path = self.root
        self.source_files: list[str] = list(self.files)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        index = self._index()
        for fname in self.files:
            infos, meta = read_header(self.root / fname, fname)
            self.metadata[fname] = meta
            for name, info in infos.items():
                if index is not None and index.get(name, fname) != fname:
                    continue
                self.tensors[name] = info
        if index is not None:
            for name, fname in index.items():
                if name not in self.tensors:
                    raise UserError(f"{self.root / INDEX_NAME} maps {name} to {fname}, which does not hold it; "
                                    f"the checkpoint is incomplete, re-download it")

    def _index(self) -> dict[str, str] | None:
        p = weight_index(self.root)
        return None if p is None else read_index(p)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(f"tensor {name} is missing from the checkpoint in {self.root}; "
                            f"the checkpoint is incomplete or the profile names the wrong tensor") from None

    def get(self, name: str) -> torch.Tensor:
        """Read one whole tensor (only for the small layer-0 tensors)."""
        info = self.info(name)
        try:
            with safe_open(self.root / info.file, framework="pt") as f:
                return f.get_tensor(name)
        except (OSError, SafetensorError) as e:
            raise UserError(f"{self.root / info.file}: cannot read tensor {name} ({e}); re-download the file") \
                from None

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, read without loading the rest."""
        info = self.info(name)
        try:
            with safe_open(self.root / info.file, framework="pt") as f:
                return f.get_slice(name)[start:stop]
        except (OSError, SafetensorError) as e:
            raise UserError(f"{self.root / info.file}: cannot read rows of {name} ({e}); re-download the file") \
                from None


class PartialCheckpoint(Checkpoint):
    """Only the files of a checkpoint that hold the given tensors (what an overlay reads)."""

    def __init__(self, root: Path, wmap: dict[str, str], names: list[str]):
        self.root = self.source_root = Path(root)
        self.files = sorted({wmap[n] for n in names if n in wmap})
        self.source_files = list(self.files)
        self.tensors = {}
        self.metadata = {}
        for fname in self.files:
            infos, meta = read_header(self.root / fname, fname)
            self.metadata[fname] = meta
            for name, info in infos.items():
                if wmap.get(name) == fname:
                    self.tensors[name] = info
        for name in names:
            if wmap.get(name) in self.files and name not in self.tensors:
                raise UserError(f"{self.root / INDEX_NAME} maps {name} to {wmap[name]}, which does not hold it; "
                                f"the checkpoint is incomplete, re-download it")


def read_index(path: Path) -> dict[str, str]:
    """An index's weight_map; every file it names must be a plain relative path inside the checkpoint."""
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; the checkpoint is incomplete, re-download it") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise UserError(f"{path} is not a valid safetensors index (no weight_map of file names); re-download it")
    for fname in sorted(set(wm.values())):
        check_inside(path.parent, fname, f"{path}: weight_map file")
    return dict(wm)


def mapped(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """A tensor as a view of its memory-mapped file, in its stored dtype.

    The pages are file-backed (the kernel can drop and re-read them), so a large layer-0 FFN
    costs no anonymous memory; precompile's `folded_ffn` casts it block by block.
    """
    info = ckpt.info(name)
    if info.numel == 0:
        return ckpt.get(name)
    with open(ckpt.root / info.file, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: nothing can write the source
    return torch.frombuffer(mm, dtype=DTYPES[info.dtype], count=info.numel, offset=info.start).view(info.shape)


def _files_named_by(index: Path, problem: str, fix: str) -> list[str]:
    """The weight files an index names, sorted, all present beside it."""
    root = index.parent
    files = sorted(set(read_index(index).values()))
    missing = [f for f in files if not (root / f).exists()]
    if missing:
        raise UserError(f"{problem} in {root}: {', '.join(missing)} (named by {index.name}); {fix}")
    return files


def checkpoint_files(root: Path) -> list[str]:
    """The safetensors files of a checkpoint, checking that every file its index names is present."""
    index = weight_index(root)
    if index is not None:
        return _files_named_by(index, "missing or incomplete model files",
                               "download them, or use --overlay to read only layer 0")
    if (root / SINGLE_NAME).exists():
        return [SINGLE_NAME]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")) or any(root.glob("*.pth")):
        raise UserError(f"{root} holds only PyTorch pickle weights (*.bin/*.pt); convert them to safetensors "
                        f"first, or pass --allow-pickle")
    raise UserError(f"no {SINGLE_NAME} or {INDEX_NAME} in {root}; SOURCE must be a Hugging Face checkpoint "
                    f"with safetensors weights (for PyTorch *.bin weights pass --allow-pickle)")


def pickle_files(root: Path) -> list[str]:
    """PyTorch pickle weight files of a checkpoint (by its index when it has one), sorted."""
    index = root / PICKLE_INDEX
    if index.exists():
        return _files_named_by(index, "missing model files", "download them")
    return sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def open_checkpoint(root: Path, allow_pickle: bool = False, scratch: Path | None = None) -> Checkpoint:
    """The checkpoint in root. Pickle-only weights are refused unless allow_pickle; then they are loaded with
    torch.load(weights_only=True), which runs no code from the file, and rewritten as a safetensors view in
    `scratch`, so that everything downstream reads safetensors only."""
    root = Path(root)
    if has_safetensors(root) or not allow_pickle:
        return Checkpoint(root)
    files = pickle_files(root)
    if not files:
        return Checkpoint(root)  # names what is missing
    if scratch is None:
        raise ValueError("open_checkpoint: a scratch directory is needed for a pickle checkpoint")
    check_free_space(Path(scratch), sum((root / f).stat().st_size for f in files),
                     "a safetensors copy of the pickle weights")
    pickle_to_safetensors(root, files, Path(scratch))
    ckpt = Checkpoint(Path(scratch))
    ckpt.source_root = root
    ckpt.source_files = files + ([PICKLE_INDEX] if (root / PICKLE_INDEX).exists() else [])
    return ckpt


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A flat tensor state dict from a PyTorch pickle, loaded with weights_only=True (no code runs)."""
    import pickle
    import zipfile

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln), None)
        if why is None:  # not a pickle at all, or a damaged one
            raise UserError(f"{path}: cannot be read as a PyTorch checkpoint ({lines[-1][:200] if lines else e!r}); "
                            f"re-download it") from None
        raise UserError(f"{path}: refused to unpickle: it holds more than tensors ({why[:200]}); only plain tensor "
                        f"state dicts are loaded, convert it to safetensors yourself if you trust it") from None
    except Exception as e:  # noqa: BLE001 - any failure of a foreign file is bad input
        raise UserError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); re-download it") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{path}: not a flat state dict of tensors; save the model's state_dict() or safetensors")
    bad = [k for k, v in sd.items() if v.dtype not in DTYPE_NAMES]
    if bad:
        raise UserError(f"{path}: tensor {bad[0]} has unsupported dtype {sd[bad[0]].dtype}")
    return sd


def pickle_to_safetensors(root: Path, files: list[str], dest: Path) -> list[str]:
    """Rewrite pickle weight files as safetensors shards (plus an index when several) in dest."""
    dest.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    out_files = []
    for i, fname in enumerate(files):
        out = SINGLE_NAME if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        sd = load_pickle(root / fname)
        entries = [(n, DTYPE_NAMES[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for n, t in sd.items()]
        with open(dest / out, "wb") as f:
            write_header(f, entries, {"format": "pt"})
            for t in sd.values():
                f.write(tensor_bytes(t))
        weight_map.update({n: out for n in sd})
        out_files.append(out)
        del sd
    if len(files) > 1:
        (dest / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out_files


def write_header(f, tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> int:
    """Write a safetensors header for (name, dtype, shape, nbytes) in order; returns the data start offset.

    The JSON is compact, keys in the given order, padded with spaces to 8 bytes as safetensors does.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    off = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    return 8 + len(raw)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, as safetensors stores them."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
