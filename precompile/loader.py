"""Load a precompiled checkpoint as a transformers model (also shipped as OUT_DIR/precompile_loader.py).

This one file is both `precompile.loader` and the shim written into every output
directory, so it imports only torch, safetensors, transformers and huggingface_hub.
transformers' model code is imported when a model is loaded, not with this module:
every CLI start imports it, and that import alone takes seconds.

The model is the original transformers class with a few layer-0 modules swapped
for lookups, so attention, RoPE, the KV cache, masks, generate() and every
attention backend stay transformers' own:
- the embedding module returns the residual part of the table row (x, or x + FFN
  for parallel blocks) and keeps the q/k/v part for layer 0 of the same call;
- layer 0's q/k/v projections (or the fused qkv) return slices of that part;
- norms that fed only those become identities; a folded FFN returns zeros.

An overlay (manifest "kind": "overlay") holds only the table: its base model is
found from the manifest (the HF cache or hub at the recorded revision, the recorded
local path, or an explicit `base=`), checked against the recorded hashes, and
loaded through a temporary directory that links only the base shards holding
tensors the precompiled model keeps, so the eliminated tensors are never read.

Usage: `model = load("out/")`, or from OUT_DIR alone: this file loaded with importlib's
`spec_from_file_location` (never with OUT_DIR on sys.path) / `AutoModelForCausalLM.from_pretrained(out,
trust_remote_code=True)`.
"""

# No `from __future__ import annotations`: run from a file without a sys.modules entry (importlib's
# spec_from_file_location), dataclasses cannot resolve string annotations.
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FORMAT_VERSION = 2  # 2: the table file holds its guard, config.json the plain-load message; loader.x_scale may be set
READABLE_VERSIONS = (1, 2)  # 1: written before the guard was required
MANIFEST = "precompile.json"
# The loader imports nothing of the package, so it keeps copies; tests/test_manifest.py checks they agree.
INDEX = "model.safetensors.index.json"  # Copied from precompile.io.weight_file_names.INDEX_NAME
SINGLE = "model.safetensors"  # Copied from precompile.io.weight_file_names.SINGLE_NAME
TABLE = "precompile_table.safetensors"  # Copied from precompile.plan.table_layout.TABLE_FILE
SHIM = "precompile_loader.py"  # Copied from precompile.convert.SHIM_FILE
GUARD_SHAPE = (1,)  # Copied from precompile.plan.table_layout.GUARD_SHAPE
# Copied from precompile.plan.table_layout.GUARD_NOTE
GUARD_NOTE = ("{guard} here is a 1-element guard, not a weight: its shape makes plain transformers stop instead of "
              "loading this directory as the original model with random layer-0 weights; load it with "
              "precompile.load or from_pretrained(..., trust_remote_code=True)")
# OUT_DIR/config.json's `transformers_weights`: transformers reads it only to load the model's weights, and stops
# on a value that names no safetensors file with an error that ends with this text. AutoConfig and AutoTokenizer
# keep it as an unused attribute; config.save_pretrained drops it.
PLAIN_LOAD_MESSAGE = ("this is a precompiled model, whose layer 0 is a lookup table that plain transformers would "
                      "replace with random weights: load it with AutoModelForCausalLM.from_pretrained(path, "
                      "trust_remote_code=True) or precompile.load(path)")
# Copied from precompile.io.safetensors_files.TORCH_DTYPES
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}
# The safetensors code of each of _DTYPES (precompile.tensors.DTYPE_NAMES of TORCH_DTYPES)
_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


class PrecompileLoadError(RuntimeError):
    """The directory is not a loadable precompiled model, or does not match its manifest."""


class BaseMismatchError(PrecompileLoadError):
    """An overlay's base is there but is not the model the table was computed from (revision or file hashes)."""


class _Kept:
    """The q/k/v part of the rows looked up by this forward call, until layer 0 has used it."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None


class TableEmbedding(nn.Module):
    """Replaces the input embedding: one row lookup gives the residual and layer 0's q/k/v.

    It has a `.weight` only when the LM head is tied: that is the real embedding, which the head
    keeps using (and from which x is read when the table leaves it out). The table itself is
    `.table`, so nothing can tie the head to it.

    `x_scale`: x is the kept row times this scale, computed as transformers' scaled embedding modules
    do (`row * embed_scale.to(weight.dtype)`: the scale a 0-dim tensor of the weight's dtype, the product
    rounded once), and as the table's q/k/v were computed from it, so the values are the same.
    """

    def __init__(self, vocab: int, width: int, x_stop: int, hidden: int, tied: bool, kept: _Kept,
                 padding_idx: int | None = None, x_scale: float | None = None):
        super().__init__()
        self.x_scale = x_scale
        self.table = nn.Parameter(torch.empty(vocab, width), requires_grad=False)
        if tied:
            self.weight = nn.Parameter(torch.empty(vocab, hidden))
        self.x_stop = x_stop
        self.num_embeddings = vocab
        self.embedding_dim = hidden
        self.padding_idx = padding_idx
        self._kept = kept

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.table.detach())  # a constant of the model: never trained
        self._kept.rows = rows
        if self.x_stop:
            return rows[..., : self.x_stop]
        x = nn.functional.embedding(input_ids, self.weight)
        if self.x_scale is None:
            return x
        return x * torch.tensor(self.x_scale, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        x = "table" if self.x_stop else "embedding" + (f" * {self.x_scale:g}" if self.x_scale is not None else "")
        return f"table={tuple(self.table.shape)}, x={x}"

    def __getattr__(self, name: str):
        """Untied, `.weight` is the table's residual columns (a view, not a parameter): model code that reads
        `embed_tokens.weight.device` or `.dtype` (Llama 4) finds the table's."""
        if name == "weight" and "weight" not in self._parameters and self.x_stop:
            return self.table[:, : self.x_stop]
        return super().__getattr__(name)


class TableSlice(nn.Module):
    """Replaces a layer-0 projection: returns its precomputed output, ignoring the input."""

    def __init__(self, start: int, stop: int, kept: _Kept, zero_masked: bool = False):
        super().__init__()
        self.start, self.stop = start, stop
        self._kept = kept
        self.zero_masked = zero_masked

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = self._kept.rows
        if rows is None:
            raise RuntimeError("a precompiled model needs input_ids: its layer-0 projections are looked up "
                               "by token id, so inputs_embeds cannot be used")
        if rows.shape[:-1] != hidden.shape[:-1]:
            raise RuntimeError(f"precompiled lookup rows {tuple(rows.shape[:-1])} do not match layer 0's "
                               f"input {tuple(hidden.shape[:-1])}")
        out = rows[..., self.start: self.stop].to(hidden.device)  # with a device_map, the table may sit elsewhere
        if self.zero_masked:  # the mixer zeroed padded positions' input (a bias-free projection of 0 is 0)
            out = out * hidden.ne(0).any(-1, keepdim=True).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"columns={self.start}:{self.stop}"


class NormIdentity(nn.Identity):
    """Replaces a layer-0 norm whose only consumers now read the table.

    Like the norm it has a `weight` of the model's dtype (Mamba's block casts its input to
    `norm.weight.dtype`): the looked-up rows, which layer 0 of the same call reads.
    """

    def __init__(self, kept: _Kept):
        super().__init__()
        self._kept = kept

    @property
    def weight(self) -> torch.Tensor:
        if self._kept.rows is None:
            raise RuntimeError("a precompiled model needs input_ids: layer 0 reads its looked-up rows")
        return self._kept.rows


class Zeros(nn.Module):
    """Replaces layer 0's FFN in a parallel block: its output is already in the table's residual."""

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden)


def _set(d: dict, **optional) -> dict:
    """d with each optional field that is set: a field older outputs lack stays absent, not null."""
    return {**d, **{k: v for k, v in optional.items() if v is not None}}


@dataclass(frozen=True)
class TableColumn:
    """One column group of the table row: `name` is "x", "x+ffn", or a projection role ("q", "k", "v", "qkv")."""

    name: str
    start: int
    stop: int
    holds: str | None
    module: str | None = None  # the layer-0 module whose output this slice replaces
    zero_masked: bool = False  # the module's input is zero at padded positions: so is the looked-up output

    def to_dict(self) -> dict:
        return _set({"name": self.name, "start": self.start, "stop": self.stop, "holds": self.holds},
                    module=self.module or None, zero_masked=self.zero_masked or None)


@dataclass(frozen=True)
class TableRecord:
    """Where the table is and how its row is laid out (manifest "table")."""

    file: str
    tensor: str
    shape: tuple[int, int]
    dtype: str
    columns: tuple[TableColumn, ...]
    guard: str | None = None  # the table file's one-element guard tensor; absent in older outputs

    def to_dict(self) -> dict:
        return _set({"file": self.file, "tensor": self.tensor, "shape": list(self.shape), "dtype": self.dtype,
                     "columns": [c.to_dict() for c in self.columns]}, guard=self.guard)


@dataclass(frozen=True)
class LoaderRecord:
    """The modules the loader swaps for lookups (manifest "loader")."""

    embedding_module: str
    attention_module: str
    hidden_size: int
    x_stop: int  # the residual's columns end here; 0: x is read from the kept embedding
    keep_embedding: bool
    identity_modules: tuple[str, ...] = ()
    zero_modules: tuple[str, ...] = ()
    x_scale: float | None = None  # x_stop 0: x is the kept embedding row times this (absent: the row itself)

    def to_dict(self) -> dict:
        return _set({"embedding_module": self.embedding_module, "hidden_size": self.hidden_size,
                     "x_stop": self.x_stop, "keep_embedding": self.keep_embedding,
                     "identity_modules": list(self.identity_modules), "zero_modules": list(self.zero_modules),
                     "attention_module": self.attention_module}, x_scale=self.x_scale)


@dataclass(frozen=True)
class SourceRecord:
    """The original model (manifest "source"): a hub id at a revision, or a local path, and what was read.

    `sizes` (and for a local source `mtimes`) of the base's files are recorded by overlays only, so that
    loading can check the base without reading it.
    """

    config: dict
    id: str | None = None
    revision: str | None = None
    path: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # path inside the source -> sha256
    sizes: dict[str, int] | None = None
    mtimes: dict[str, int] | None = None

    def describe(self) -> str:
        return f"{self.id}@{self.revision}" if self.id else str(self.path)

    def to_dict(self) -> dict:
        d: dict = {"id": self.id, "revision": self.revision} if self.id is not None else {"path": self.path}
        return _set({**d, "files": self.files, "config": self.config}, sizes=self.sizes, mtimes=self.mtimes)


@dataclass(frozen=True)
class ProfileRecord:
    """The architecture profile a conversion used (manifest "profile"); older manifests may lack any field."""

    name: str | None = None
    block: str | None = None
    attention: str | None = None
    path: str | None = None
    text: str | None = None  # the YAML itself, so the conversion can be checked without the file

    def to_dict(self) -> dict:
        return {"name": self.name, "block": self.block, "attention": self.attention, "path": self.path,
                "text": self.text}


@dataclass(frozen=True)
class Manifest:
    """OUT_DIR/precompile.json: what was converted from what, and how the loader rebuilds the model.

    `read` (or `from_dict`) is the one parser, with every check; `to_dict` is what the converter writes.
    For the same inputs `from_dict(m.to_dict()) == m` and the written JSON is the same bytes.
    """

    source: SourceRecord
    table: TableRecord
    loader: LoaderRecord
    profile: ProfileRecord = ProfileRecord()
    options: dict = field(default_factory=dict)  # the conversion options (dtype, compute_dtype, ...)
    eliminated: tuple[str, ...] = ()
    outputs: dict[str, str] = field(default_factory=dict)  # OUT_DIR file -> sha256
    output_sizes: dict[str, int] | None = None
    kind: str = "full"  # or "overlay": the table only, loaded over the unchanged source
    tool_version: str | None = None
    format_version: int = FORMAT_VERSION
    # Written by save_pretrained (absent from a conversion): {"by", "from", "changed"}; `changed` lists the tensors
    # that differ from the checkpoint the model was loaded from (null: that could not be read), and when it is not
    # empty `source` still says where the table came from but no longer describes every weight (see SAVED_NOTE).
    saved: dict | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Manifest":
        """Read and check OUT_DIR/precompile.json."""
        p = Path(path) / MANIFEST
        try:
            if p.exists() and not p.is_file():
                raise OSError(f"{p} is not a regular file")
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PrecompileLoadError(f"{path} is not a precompiled model (no {MANIFEST}); "
                                      f"convert it with `precompile convert` first") from None
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise PrecompileLoadError(f"{p} cannot be read ({e}); the conversion is damaged, convert again") from None
        return cls.from_dict(data, p)

    @classmethod
    def from_dict(cls, m: object, where: str | os.PathLike = MANIFEST) -> "Manifest":
        """The manifest in `m` (precompile.json as parsed JSON), checked; `where` names it in errors."""
        if not isinstance(m, dict) or m.get("format") != "precompile":
            raise PrecompileLoadError(f"{where} is not a precompile manifest; convert the model again")
        version = m.get("format_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise PrecompileLoadError(f"{where} has format version {version}, this loader reads "
                                      f"{' and '.join(map(str, READABLE_VERSIONS))}; convert again with this version "
                                      f"or use a matching loader")
        for key in ("table", "loader", "source"):
            if not isinstance(m.get(key), dict):
                raise PrecompileLoadError(f"{where} has no '{key}' section; the conversion is damaged, convert again")
        problem = _manifest_problem(m)
        if problem:
            raise PrecompileLoadError(f"{where} is malformed: {problem}; the conversion is damaged, convert again")
        t, ld, src = m["table"], m["loader"], m["source"]
        prof = m.get("profile") if isinstance(m.get("profile"), dict) else {}
        return cls(
            source=SourceRecord(config=src["config"], id=src.get("id"), revision=src.get("revision"),
                                path=src.get("path"), files=src.get("files", {}), sizes=src.get("sizes"),
                                mtimes=src.get("mtimes")),
            table=TableRecord(t["file"], t["tensor"], tuple(t["shape"]), t["dtype"],
                              tuple(TableColumn(c["name"], c["start"], c["stop"], c.get("holds"), c.get("module"),
                                                bool(c.get("zero_masked")))
                                    for c in t["columns"]), t.get("guard")),
            loader=LoaderRecord(ld["embedding_module"], ld["attention_module"], ld["hidden_size"], ld["x_stop"],
                                ld["keep_embedding"], tuple(ld.get("identity_modules", [])),
                                tuple(ld.get("zero_modules", [])),
                                None if ld.get("x_scale") is None else float(ld["x_scale"])),
            profile=ProfileRecord(**{k: v if isinstance(v, str) else None for k, v in prof.items()
                                     if k in ProfileRecord.__dataclass_fields__}),
            options=m.get("options", {}), eliminated=tuple(m.get("eliminated", [])), outputs=m.get("outputs", {}),
            output_sizes=m.get("output_sizes"), kind=m.get("kind", "full"),
            tool_version=m.get("tool_version") if isinstance(m.get("tool_version"), str) else None,
            format_version=version, saved=m.get("saved"))

    @classmethod
    def coerce(cls, m: "Manifest | dict") -> "Manifest":
        """A Manifest from itself or from the dict `read_manifest` returns (public functions take either)."""
        return m if isinstance(m, Manifest) else cls.from_dict(m)

    def to_dict(self) -> dict:
        """precompile.json's content: the converter writes exactly this."""
        d = {"format": "precompile", "format_version": self.format_version, "tool_version": self.tool_version,
             "kind": self.kind, "profile": self.profile.to_dict(), "source": self.source.to_dict(),
             "options": self.options, "table": self.table.to_dict(), "loader": self.loader.to_dict(),
             "eliminated": list(self.eliminated), "outputs": self.outputs}
        return _set(d, output_sizes=self.output_sizes, saved=self.saved)

    @property
    def guarded(self) -> bool:
        """Whether this format requires the guard (table.guard and config.json's PLAIN_LOAD_MESSAGE)."""
        return self.format_version >= 2


def read_manifest(path: str | os.PathLike) -> dict:
    """OUT_DIR/precompile.json, checked (see `Manifest.read`), as the JSON dict."""
    return Manifest.read(path).to_dict()


def _plain(name: object) -> bool:
    """A bare file name inside OUT_DIR: no folder, no `..`."""
    return isinstance(name, str) and name not in ("", ".", "..") and not set(name) & {"/", "\\", "\0"}


def _relative(name: object) -> bool:
    """A path inside the source directory: relative, without `..`."""
    return isinstance(name, str) and bool(name) and not name.startswith("/") and ".." not in name.split("/") \
        and "\0" not in name


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with the manifest's types and paths, checked once so that nothing downstream meets a
    field of the wrong type; every path it records must stay inside OUT_DIR (or the source)."""
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def str_list(x) -> bool:
        return isinstance(x, list) and all(isinstance(v, str) for v in x)

    def int_map(x) -> bool:
        return isinstance(x, dict) and all(isinstance(k, str) and is_int(v) for k, v in x.items())

    t, ld, src = m["table"], m["loader"], m["source"]
    checks = [
        (_plain(t.get("file")), "table.file must be a file name inside OUT_DIR"),
        (isinstance(t.get("tensor"), str), "table.tensor must be a string"),
        (isinstance(t.get("shape"), list) and len(t["shape"]) == 2 and all(is_int(x) and x >= 0 for x in t["shape"]),
         "table.shape must be two non-negative integers"),
        (t.get("dtype") in _DTYPES, f"table.dtype must be one of {', '.join(_DTYPES)}"),
        (isinstance(t.get("columns"), list) and bool(t["columns"]) and all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and is_int(c.get("start")) and is_int(c.get("stop"))
            for c in t["columns"]), "table.columns must be a list of {name, start, stop}"),
        (isinstance(ld.get("embedding_module"), str) and isinstance(ld.get("attention_module"), str),
         "loader.embedding_module and loader.attention_module must be strings"),
        (is_int(ld.get("hidden_size")) and is_int(ld.get("x_stop")), "loader.hidden_size and x_stop must be integers"),
        (isinstance(ld.get("keep_embedding"), bool), "loader.keep_embedding must be true or false"),
        (ld.get("x_scale") is None or (isinstance(ld["x_scale"], (int, float)) and not isinstance(ld["x_scale"], bool)
                                       and ld["x_stop"] == 0 and ld["keep_embedding"]
                                       and m.get("format_version") == FORMAT_VERSION),
         f"loader.x_scale must be a number, with x_stop 0, keep_embedding and format version {FORMAT_VERSION}"),
        (str_list(ld.get("identity_modules", [])) and str_list(ld.get("zero_modules", [])),
         "loader.identity_modules and zero_modules must be lists of strings"),
        (str_list(m.get("eliminated", [])), "eliminated must be a list of strings"),
        (m.get("kind", "full") in ("full", "overlay"), "kind must be full or overlay"),
        (isinstance(m.get("outputs", {}), dict) and all(_plain(k) and isinstance(v, str)
                                                        for k, v in m.get("outputs", {}).items()),
         "outputs must map file names inside OUT_DIR to sha256"),
        (isinstance(src.get("config"), dict) and isinstance(src["config"].get("model_type"), str),
         "source.config must be the original config.json with its model_type"),
        (isinstance(src.get("files", {}), dict) and all(_relative(k) and isinstance(v, str)
                                                      for k, v in src.get("files", {}).items()),
         "source.files must map paths inside the source to sha256"),
        (all(isinstance(src.get(k), (str, type(None))) for k in ("id", "revision", "path")),
         "source.id, revision and path must be strings"),
        (isinstance(m.get("options", {}), dict) and m.get("options", {}).get("compute_dtype", "float32") in _DTYPES,
         "options must be an object whose compute_dtype is a float dtype"),
        (all(int_map(x) for x in (m.get("output_sizes", {}), src.get("sizes", {}), src.get("mtimes", {}))),
         "output_sizes, source.sizes and source.mtimes must map file names to integers"),
        (isinstance(t.get("guard", ""), str), "table.guard must be a tensor name"),
        (m.get("saved") is None or (isinstance(m["saved"], dict) and (m["saved"].get("changed") is None or str_list(
            m["saved"]["changed"]))), "saved must be an object whose changed is a list of tensor names or null"),
    ]
    return next((why for ok, why in checks if not ok), None)


def indexed_table_file(path: Path, manifest: Manifest | dict) -> str:
    """The file that OUT_DIR's index names for the table tensor: what transformers loads, and so what every
    check must read (a manifest naming another file would vouch for a table the model never uses).
    Every file the index names must be a regular file inside OUT_DIR. An overlay, or a directory
    without an index, loads the manifest's file."""
    path, manifest = Path(path), Manifest.coerce(manifest)
    if manifest.kind != "full" or not (path / INDEX).exists():
        return manifest.table.file
    try:
        wm = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
        named = wm.get(manifest.table.tensor)
        files = sorted(map(str, wm.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise PrecompileLoadError(f"{path / INDEX} cannot be read ({type(e).__name__}); the conversion is damaged, "
                                  f"convert again") from None
    bad = next((f for f in files if not _plain(f)), None)
    if bad is not None:
        raise PrecompileLoadError(f"{path / INDEX} names {bad!r}, which is not a file inside {path}; the conversion "
                                  f"is damaged, convert again")
    bad = next((f for f in files if not (path / f).is_file()), None)  # a FIFO would block the load
    if bad is not None:
        raise PrecompileLoadError(f"{path / bad} is missing or not a regular file; the conversion is damaged, "
                                  f"convert again")
    if not isinstance(named, str):
        raise PrecompileLoadError(f"{path / INDEX} does not name the table {manifest.table.tensor}; the "
                                  f"conversion is damaged, convert again")
    return named


def original_config(manifest: Manifest) -> "PretrainedConfig":
    """The source model's transformers config, as recorded at conversion time."""
    return config_from_dict(manifest.source.config)


_SPECIAL_FLOATS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _decode_floats(obj):
    """config.json's {"__float__": "Infinity"} (how transformers writes inf, e.g. Mamba-2's time_step_limit)
    as floats."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj["__float__"]]
        return {k: _decode_floats(v) for k, v in obj.items()}
    return [_decode_floats(v) for v in obj] if isinstance(obj, list) else obj


def config_from_dict(config: dict) -> "PretrainedConfig":
    """The transformers config of config.json's values, read as from_pretrained reads the file."""
    from transformers import AutoConfig

    cfg = _decode_floats(dict(config))
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _set_unlisted(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` as a plain attribute, outside its parent's `_modules`: the parent's forward calls
    it and `get_submodule` finds it, but `named_modules` does not list it, so PEFT's name matching
    (`target_modules=["q_proj", ...]`) and accelerate's placement skip a lookup that has no weight."""
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    owner._modules.pop(name, None)
    owner.__dict__[name] = module


def apply_layout(model: nn.Module, manifest: Manifest | dict) -> None:
    """Swap the layer-0 modules named in the manifest for table lookups (on any device, meta included)."""
    manifest = Manifest.coerce(manifest)
    table, spec = manifest.table, manifest.loader
    kept = _Kept()
    old = model.get_submodule(spec.embedding_module)
    emb = TableEmbedding(table.shape[0], table.shape[1], spec.x_stop, spec.hidden_size,
                         spec.keep_embedding, kept, getattr(old, "padding_idx", None), spec.x_scale)
    _set_module(model, spec.embedding_module, emb)
    for col in table.columns:
        if col.module:
            _set_unlisted(model, col.module, TableSlice(col.start, col.stop, kept, col.zero_masked))
    for path in spec.identity_modules:
        _set_module(model, path, NormIdentity(kept))
    for path in spec.zero_modules:
        _set_module(model, path, Zeros())

    def clear(*_args) -> None:
        kept.rows = None

    model.get_submodule(spec.attention_module).register_forward_hook(clear)
    model.register_forward_pre_hook(clear)  # a call with inputs_embeds must not see an older call's rows


def precompiled_class(base: type, manifest: Manifest | dict) -> type:
    """The original model class whose __init__ swaps layer 0 before any weight is loaded.

    Swapping first means transformers' own loading (dtype, device, tied weights, fused
    experts) sees exactly the tensors in OUT_DIR: nothing is random-initialised and the
    eliminated tensors never exist in memory.
    """

    manifest = Manifest.coerce(manifest)

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_layout(self, manifest)
        self._precompile_origin = None  # (OUT_DIR, an overlay's base or None), set by `load`: what save compares

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs):
        base._set_gradient_checkpointing(self, enable, *args, **kwargs)
        _layer0_not_checkpointed(self, manifest)

    def train(self, mode: bool = True):
        base.train(self, mode)
        freeze_table(self, manifest)
        return self

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError(RESIZE_MESSAGE)

    def save_pretrained(self, save_directory, *args, **kwargs):
        return save_precompiled(self, base, manifest, save_directory, *args, **kwargs)

    # An overlay's base shards still hold the eliminated tensors: transformers skips them (never reading
    # their data) and need not report them as unexpected.
    ignore = list(getattr(base, "_keys_to_ignore_on_load_unexpected", None) or [])
    ignore += [rf"(^|\.){re.escape(n)}$" for n in manifest.eliminated]
    methods = {f.__name__: f for f in (__init__, _set_gradient_checkpointing, train, resize_token_embeddings,
                                        save_pretrained)}
    return type(base.__name__, (base,), {**methods, "__module__": base.__module__,
                                         "_keys_to_ignore_on_load_unexpected": ignore})


RESIZE_MESSAGE = ("resize_token_embeddings cannot grow or shrink a precompiled model: each token's table row was "
                  "computed with layer 0's weights, which the conversion eliminated; resize the original model, "
                  "then convert it again")


def freeze_table(model: nn.Module, manifest: Manifest | dict) -> None:
    """The table is a constant of the model (its rows are layer 0's outputs): never a trainable parameter."""
    model.get_submodule(Manifest.coerce(manifest).loader.embedding_module).table.requires_grad_(False)


def _layer0_not_checkpointed(model: nn.Module, manifest: Manifest) -> None:
    """Gradient checkpointing replays a layer in backward, after its forward call: layer 0's lookups would find
    the call's rows gone. Layer 0 has no projections left to recompute, so it is simply not checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    parts = manifest.loader.attention_module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        mod = model.get_submodule(".".join(parts[:i]))
        if isinstance(mod, GradientCheckpointingLayer):
            mod.gradient_checkpointing = False


def _check_table(path: Path, manifest: Manifest, config: "PretrainedConfig") -> None:
    from safetensors import safe_open

    table = manifest.table
    f = path / table.file
    if not f.is_file():  # a FIFO or device would block or never end
        raise PrecompileLoadError(f"{f} is missing or not a regular file; the conversion is incomplete, convert again")
    try:
        with safe_open(f, framework="pt") as sf:
            if table.tensor not in sf.keys():
                raise PrecompileLoadError(f"{f} does not hold {table.tensor}; convert again")
            sl = sf.get_slice(table.tensor)
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
    except PrecompileLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file, whatever safetensors calls it
        raise PrecompileLoadError(f"{f} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                  f"the conversion is damaged, convert again") from None
    cols = table.columns
    width = cols[-1].stop if cols else 0
    ok_cols = all(a.stop == b.start for a, b in zip(cols, cols[1:])) and cols and cols[0].start == 0
    if not ok_cols:
        raise PrecompileLoadError(f"{f}: the manifest's table columns are not contiguous from 0 "
                                  f"({[(c.start, c.stop) for c in cols]}); convert again")
    if shape != list(table.shape) or shape[1] != width:
        raise PrecompileLoadError(f"{f}: table shape {shape} does not match the manifest's layout "
                                  f"{list(table.shape)} (width {width}); convert again")
    if shape[0] != config.vocab_size:
        raise PrecompileLoadError(f"{f}: table has {shape[0]} rows but the model's vocab_size is "
                                  f"{config.vocab_size}; convert again")
    _check_widths(f, cols, manifest, config)
    want = _CODES.get(table.dtype)
    if dtype != want:
        raise PrecompileLoadError(f"{f}: table dtype {dtype} differs from the manifest's {table.dtype}; "
                                  f"convert again")


def _check_widths(f: Path, cols: tuple[TableColumn, ...], manifest: Manifest, config: "PretrainedConfig") -> None:
    """The residual and q columns must be as wide as the model they are loaded into says."""
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    want = {"x": hidden, "x+ffn": hidden, "q": heads * head_dim}
    if manifest.loader.hidden_size != hidden:
        raise PrecompileLoadError(f"{f}: the manifest's hidden size {manifest.loader.hidden_size} differs "
                                  f"from the config's {hidden}; convert again")
    for c in cols:
        w = c.stop - c.start
        if c.name in want and w != want[c.name]:
            raise PrecompileLoadError(f"{f}: table column {c.name} is {w} wide, but the config implies "
                                      f"{want[c.name]}; the table does not belong to this model, convert again")


# Copied from precompile.io.hashed_copy.file_sha256, less its hub-blob shortcut (this one checks the bytes)
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()


_SHA256 = re.compile(r"^[0-9a-f]{64}$")  # Copied from precompile.io.hashed_copy._SHA256


# Copied from precompile.io.hashed_copy.blob_sha256
def _blob_sha256(path: Path) -> str | None:
    """The sha256 of a hub cache file without reading it: its blob is named by it (None elsewhere)."""
    real = Path(os.path.realpath(path))
    if Path(path).is_symlink() and real.parent.name == "blobs" and _SHA256.match(real.name):
        return real.name
    return None


# Copied from precompile.io.weight_file_names.weight_index with INDEX_NAME->INDEX, SINGLE_NAME->SINGLE
def _weight_index(root: Path) -> Path | None:
    """The index mapping each tensor to its file, or None when the checkpoint is one model.safetensors
    (which wins when both are present, as transformers loads it)."""
    index = root / INDEX
    return index if index.exists() and not (root / SINGLE).exists() else None


def _base_files(root: Path) -> dict[str, str]:
    """The base's tensor name -> file map: its index, or the header of its single file."""
    if _weight_index(root) is not None:
        try:
            wm = dict(json.loads((root / INDEX).read_text(encoding="utf-8"))["weight_map"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise PrecompileLoadError(f"{root / INDEX} cannot be read ({e}); the base checkpoint is damaged") from None
        bad = next((f for f in sorted(map(str, wm.values())) if not _relative(f)), None)
        if bad is not None:
            raise PrecompileLoadError(f"{root / INDEX} names {bad!r}, a file outside the base {root}; the base "
                                      f"checkpoint is damaged")
        return wm
    from safetensors import safe_open

    try:
        with safe_open(root / SINGLE, framework="pt") as f:
            return {k: SINGLE for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same to the user
        raise PrecompileLoadError(f"the base {root} has no readable {INDEX} or {SINGLE} ({e}); pass base= the "
                                  f"original model's directory") from None


def _weight_index_name(manifest: Manifest) -> str:
    return INDEX if INDEX in manifest.source.files else SINGLE


class SourceNotFoundError(PrecompileLoadError):
    """The manifest records no original model, or a local directory that is gone."""


def locate_source(manifest: Manifest, base: str | os.PathLike | None = None,
                  hub: Callable[[str, str | None], Path] | None = None) -> Path:
    """The directory of the original model a conversion was made from.

    `base` (a directory) overrides the record; otherwise the recorded local path, or the recorded hub id at
    its revision from `hub(repo, revision)`. The default `hub` takes the HF cache (or fetches) only the
    weight files holding the tensors the precompiled model keeps: what loading an overlay reads.
    """
    src = manifest.source
    if base is not None:
        root = Path(base).expanduser()
        if not root.is_dir():
            raise PrecompileLoadError(f"base {base} is not a directory; pass the original model's directory")
        return root.resolve()
    if src.path:
        root = Path(src.path)
        if not root.is_dir():
            raise SourceNotFoundError(f"the overlay's base {root} is gone; pass base= (or --reference) the original "
                                      f"model's directory")
        return root
    if not src.id:
        raise SourceNotFoundError(f"{MANIFEST} records no source; pass base= the original model's directory")
    return (hub or _overlay_hub(manifest))(src.id, src.revision)


def _overlay_hub(manifest: Manifest) -> Callable[[str, str | None], Path]:
    """locate_source's default `hub`: the weight files an overlay loads, from the HF cache or the hub."""
    from huggingface_hub import hf_hub_download

    def snapshot(repo: str, rev: str | None) -> Path:
        def fetch(name: str) -> Path:
            try:
                return Path(hf_hub_download(repo, name, revision=rev))
            except Exception as e:  # noqa: BLE001 - offline, missing, gated: one message with the fix
                raise PrecompileLoadError(f"cannot get {name} of the overlay's base {repo} at revision {rev} "
                                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                          f"download that revision into the HF cache, or pass base= its "
                                          f"directory") from None

        root = fetch(_weight_index_name(manifest)).parent
        eliminated = set(manifest.eliminated)
        for name in sorted({f for k, f in _base_files(root).items() if k not in eliminated}):
            fetch(name)
        return root

    return snapshot


def check_base(root: Path, manifest: Manifest, full: bool = False) -> None:
    """Refuse a base that is not the one the overlay was computed from.

    Cheap by default: a hub cache names each blob by its sha256, and a local file whose size and mtime
    match the record is taken as unchanged; anything else (or full=True) is hashed. Files the table was
    not computed from are checked by size only; the revision is checked when the base is a hub snapshot.
    """
    src = manifest.source
    where = src.describe()
    rev = src.revision
    if rev and root.parent.name == "snapshots" and root.name != rev:
        raise BaseMismatchError(f"base {root} is revision {root.name}, but the overlay was computed from {where}; "
                                  f"use that revision, or convert again from this one")
    sizes, mtimes = src.sizes or {}, src.mtimes or {}
    weight_files = set(_base_files(root).values()) | {_weight_index_name(manifest)}
    for name, sha in sorted(src.files.items()):
        p = root / name
        if not p.exists():
            if name in weight_files:
                raise PrecompileLoadError(f"base {root} has no {name}, which the overlay was computed from "
                                          f"({where}); restore it or pass base= the original model")
            continue  # a tokenizer or config file: the overlay carries its own
        blob = _blob_sha256(p)
        if blob is not None and not full:
            same = blob == sha
        else:
            st = p.stat()
            if name in sizes and st.st_size != sizes[name]:
                same = False
            elif not full and blob is None and name in mtimes and st.st_mtime_ns == mtimes[name]:
                same = True
            else:
                same = _sha256(p) == sha
        if not same:
            raise BaseMismatchError(f"base file {p} differs from the one the overlay was computed from ({where}, "
                                      f"sha256 {sha[:12]}); restore the original or convert again from this base")
    for name in sorted(weight_files - set(src.files)):
        p = root / name
        if name in sizes and p.exists() and p.stat().st_size != sizes[name]:
            raise BaseMismatchError(f"base file {p} has {p.stat().st_size} bytes, {sizes[name]} when the overlay "
                                      f"was made from {where}; restore the original or convert again")


def overlay_base(path: str | os.PathLike, base: str | os.PathLike | None = None, full: bool = False,
                 manifest: Manifest | None = None) -> Path:
    """Find and check an overlay's base (see `locate_source`, `check_base`); returns its directory."""
    manifest = manifest or Manifest.read(path)
    if manifest.kind != "overlay":
        raise PrecompileLoadError(f"{path} is a full conversion, not an overlay; it needs no base")
    root = locate_source(manifest, base)
    check_base(root, manifest, full)
    return root


def _overlay_dir(path: Path, root: Path, manifest: Manifest) -> Path:
    """A temporary checkpoint directory: links to the base shards that hold kept tensors, the table, and
    an index listing only what the precompiled model loads."""
    eliminated = set(manifest.eliminated)
    table = manifest.table
    kept = {k: f for k, f in _base_files(root).items() if k not in eliminated}
    tmp = Path(tempfile.mkdtemp(prefix="precompile-overlay-"))
    try:
        links = {}
        for f in sorted(set(kept.values())):
            links[f] = "base-" + f if f == SINGLE else f  # a model.safetensors would hide the index
            missing = not (root / f).exists()
            if missing:
                raise PrecompileLoadError(f"base {root} has no {f}; download the whole base model or pass base=")
            os.symlink(os.path.realpath(root / f), tmp / links[f])
        os.symlink(os.path.realpath(path / table.file), tmp / table.file)
        weight_map = {k: links[f] for k, f in kept.items()}
        weight_map[table.tensor] = table.file
        (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
        if (path / "generation_config.json").exists():
            os.symlink(os.path.realpath(path / "generation_config.json"), tmp / "generation_config.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def load(path: str | os.PathLike | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, base: str | os.PathLike | None = None, verify_base: bool = False,
         config: "PretrainedConfig | None" = None, **kwargs):
    """Build the precompiled model from OUT_DIR (default: the directory holding this file).

    For an overlay, `base` is the original model's directory (default: from the manifest), and
    verify_base=True hashes the base files the table was computed from instead of trusting size and mtime.
    Other keywords go to transformers' `from_pretrained` of the original class (device_map, attn_implementation,
    output_loading_info, low_cpu_mem_usage, ...), with the same effect; those that cannot hold for a
    precompiled model (REFUSED) stop with one line. `config` replaces the recorded one (same model type).
    """
    from transformers import AutoModelForCausalLM

    _refuse(kwargs)
    path = Path(path) if path is not None else Path(__file__).resolve().parent
    manifest = Manifest.read(path)
    named = indexed_table_file(path, manifest)
    if named != manifest.table.file:
        raise PrecompileLoadError(f"{path / INDEX} loads the table from {named!r}, but {MANIFEST} names "
                                  f"{manifest.table.file!r}; the conversion is damaged, convert again")
    try:
        config = _given_config(config, manifest) if config is not None else original_config(manifest)
        _check_table(path, manifest, config)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PrecompileLoadError(f"{path / MANIFEST} is malformed ({type(e).__name__}: {e}); convert again") from None
    base_cls = AutoModelForCausalLM._model_mapping[type(config)]
    cls = precompiled_class(base_cls, manifest)
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    dtype = dtype or _DTYPES[manifest.table.dtype]
    root = None
    if manifest.kind == "overlay":
        root = overlay_base(path, base, verify_base, manifest)
        tmp = _overlay_dir(path, root, manifest)
        try:
            model, info = _from_pretrained(cls, tmp, path, config, dtype, kwargs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    elif base is not None:
        raise PrecompileLoadError(f"{path} is a full conversion: it holds every tensor and takes no base")
    else:
        model, info = _from_pretrained(cls, path, path, config, dtype, kwargs)
    if device is not None:
        model = model.to(device)
    freeze_table(model, manifest)
    model._precompile_origin = (path, root)
    model.eval()
    return (model, info) if kwargs.get("output_loading_info") else model


# from_pretrained arguments that cannot mean for a precompiled model what they mean for the original
REFUSED = {
    "quantization_config": "quantize the original model and convert that, or quantize after loading",
    "gguf_file": "a GGUF file holds the original model: convert it first",
    "state_dict": "the weights come from OUT_DIR (its table and the kept tensors)",
    "tp_plan": "tensor parallelism would shard the table lookups, which it does not know",
    "tp_size": "tensor parallelism would shard the table lookups, which it does not know",
    "distributed_config": "tensor parallelism would shard the table lookups, which it does not know",
    "device_mesh": "tensor parallelism would shard the table lookups, which it does not know",
    "from_tf": "OUT_DIR holds safetensors",
    "from_flax": "OUT_DIR holds safetensors",
}


def _refuse(kwargs: dict) -> None:
    for name, why in REFUSED.items():
        if kwargs.get(name) not in (None, False):
            raise PrecompileLoadError(f"from_pretrained({name}=...) is not supported for a precompiled model: {why}")


def _given_config(config, manifest: Manifest) -> "PretrainedConfig":
    """A config passed by the caller (AutoModelForCausalLM passes OUT_DIR's config.json, with any keyword
    overrides): it must be the recorded model type; its plain-load message is dropped (it would stop loading)."""
    want, got = manifest.source.config.get("model_type"), getattr(config, "model_type", None)
    if got != want:
        raise PrecompileLoadError(f"from_pretrained(config=...) has model type {got!r}, "
                                  f"but this precompiled model is a {want!r}; pass its own config or none")
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("transformers_weights", "auto_map", "precompile")}
    chosen = {k: getattr(config, f"_{k}", None) for k in ("attn_implementation", "experts_implementation")}
    # the original class's config type (AutoModelForCausalLM gave the shim's PrecompiledConfig)
    return config_from_dict({**cfg, **{k: v for k, v in chosen.items() if v is not None}, "model_type": want})


def _from_pretrained(cls: type, where: Path, path: Path, config, dtype, kwargs: dict):
    """transformers' from_pretrained and its loading info, refusing a checkpoint that lacks a weight: transformers
    would fill it with random values and only warn."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("output_loading_info", "config", "dtype", "torch_dtype")}
    model, info = cls.from_pretrained(str(where), config=config, dtype=dtype, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise PrecompileLoadError(f"{path} lacks {len(missing)} weight(s) of the model ({', '.join(missing[:3])}); "
                                  f"they would be random, the conversion is damaged or incomplete, convert again")
    return model, info


def converted_config(config: dict, original_architectures: list | None) -> dict:
    """OUT_DIR/config.json: the original config (`config`, as written), entered through the shim's classes.

    The original model type lets AutoTokenizer and AutoConfig load OUT_DIR without trust_remote_code
    (transformers asks first only for model types it does not know). Plain AutoModelForCausalLM would then
    build the original class: `transformers_weights` (PLAIN_LOAD_MESSAGE) stops it first with the way out,
    and the table file's guard (GUARD_NOTE) stops it should that key be removed.
    """
    cfg = {k: v for k, v in config.items()
           if k not in ("auto_map", "architectures", "precompile", "transformers_weights")}
    return {
        **cfg,
        "architectures": ["PrecompiledForCausalLM"],
        "auto_map": {"AutoConfig": "precompile_loader.PrecompiledConfig",
                     "AutoModelForCausalLM": "precompile_loader.PrecompiledForCausalLM"},
        "precompile": {
            "original_architectures": original_architectures,
            "load": "precompile.load(path), or from_pretrained(path, trust_remote_code=True); see precompile.json",
        },
        "transformers_weights": PLAIN_LOAD_MESSAGE,
    }


SAVED_NOTE = ("saved by save_pretrained from a loaded precompiled model; `changed` lists the tensors that differ "
              "from the checkpoint it was loaded from (null: that checkpoint could not be read): when any did, "
              "`source` records where the table came from, not every weight, and verify says so")


def save_precompiled(model, base: type, manifest: Manifest, save_directory, is_main_process: bool = True,
                     state_dict: dict | None = None, push_to_hub: bool = False, **kwargs) -> None:
    """`save_pretrained` of a precompiled model: a converted OUT_DIR (table file with its guard, manifest, config
    with auto_map, shim, shards and index, generation config) that loads to exactly this model.

    The manifest keeps the conversion's records (source, profile, layout) and adds `saved` (SAVED_NOTE);
    `outputs` are this directory's files. push_to_hub (here or `model.push_to_hub`) uploads what this writes.
    """
    from safetensors.torch import save_file

    for name, value in (("state_dict", state_dict), ("variant", kwargs.get("variant"))):
        if value is not None:
            raise PrecompileLoadError(f"save_pretrained({name}=...) is not supported for a precompiled model: it "
                                      f"saves the model's own tensors under the names its loader reads")
    if kwargs.get("safe_serialization") is False:
        raise PrecompileLoadError("save_pretrained(safe_serialization=False) is not supported for a precompiled "
                                  "model: its loader reads safetensors")
    out = Path(save_directory)
    if out.is_file():
        raise PrecompileLoadError(f"save_pretrained: {out} is a file; pass a directory")
    table_name, emb_path = manifest.table.tensor, manifest.loader.embedding_module
    table = model.get_submodule(emb_path).table.detach()
    if table.is_meta:
        raise PrecompileLoadError("save_pretrained: the table is offloaded to disk (device_map); load the model "
                                  "with the embedding on a device (or the CPU) to save it")
    sd = {k: v for k, v in model.state_dict().items() if k != table_name}
    repo = _create_repo(out, kwargs) if push_to_hub else None
    base.save_pretrained(model, out, is_main_process=is_main_process, state_dict=sd, **kwargs)
    if not is_main_process:
        return
    guard = manifest.table.guard or next(f"{c.module}.weight" for c in manifest.table.columns if c.module)
    dtype = next(k for k, v in _DTYPES.items() if v == table.dtype)
    save_file({table_name: table.contiguous().cpu(), guard: torch.zeros(GUARD_SHAPE, dtype=table.dtype)},
              str(out / TABLE), metadata={"format": "pt", "precompile": GUARD_NOTE.format(guard=guard)})
    weight_map = _saved_index(out, table_name, guard, table)
    written = json.loads((out / "config.json").read_text(encoding="utf-8"))
    original = {**{k: v for k, v in written.items() if k not in ("architectures", "auto_map", "torch_dtype")},
                "dtype": dtype}
    (out / "config.json").write_text(json.dumps(converted_config(original, [base.__name__]), indent=2) + "\n",
                                     encoding="utf-8")
    shutil.copyfile(Path(__file__), out / SHIM)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST)
    src = manifest.source
    saved = Manifest(
        source=SourceRecord({**src.config, "dtype": dtype}, src.id, src.revision, src.path, src.files),
        table=TableRecord(TABLE, table_name, tuple(table.shape), dtype, manifest.table.columns, guard),
        loader=manifest.loader, profile=manifest.profile, options={**manifest.options, "dtype": dtype},
        eliminated=manifest.eliminated, outputs={n: _sha256(out / n) for n in files},
        output_sizes={n: (out / n).stat().st_size for n in files}, kind="full", tool_version=manifest.tool_version,
        saved={"by": "save_pretrained", "from": str(model._precompile_origin[0]) if model._precompile_origin else None,
               "changed": _changed_tensors(model, out, weight_map, guard, manifest),
               "note": SAVED_NOTE})
    (out / MANIFEST).write_text(json.dumps(saved.to_dict(), indent=2) + "\n", encoding="utf-8")
    if repo is not None:
        model._upload_modified_files(str(out), repo, files_timestamps={}, commit_message=kwargs.get("commit_message"),
                                     token=kwargs.get("token"))


def _create_repo(out: Path, kwargs: dict) -> str:
    from transformers.utils.hub import hf_api

    repo_id = kwargs.pop("repo_id", None) or out.name
    return hf_api().create_repo(repo_id, exist_ok=True, token=kwargs.get("token")).repo_id


def _saved_index(out: Path, table_name: str, guard: str, table: torch.Tensor) -> dict[str, str]:
    """OUT_DIR's index after transformers saved the kept tensors: the table file added (a single
    model.safetensors is renamed into a one-shard index: the loader and verify read the table through it)."""
    from safetensors import safe_open

    if (out / SINGLE).exists():
        shard = "model-00001-of-00001.safetensors"
        os.replace(out / SINGLE, out / shard)
        with safe_open(out / shard, framework="pt") as f:
            index = {"metadata": {}, "weight_map": {k: shard for k in f.keys()}}
    else:
        index = json.loads((out / INDEX).read_text(encoding="utf-8"))
    index["weight_map"].update({table_name: TABLE, guard: TABLE})
    meta = index.setdefault("metadata", {})
    if "total_size" in meta:
        meta["total_size"] = int(meta["total_size"]) + table.numel() * table.element_size()
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index["weight_map"]


def _changed_tensors(model, out: Path, saved_map: dict[str, str], guard: str,
                     manifest: Manifest) -> list[str] | None:
    """The tensors of the saved directory `out` that differ from the checkpoint the model was loaded from (cast
    to the saved dtype), compared file to file under the names both files use; None when that checkpoint is not
    there to compare with."""
    from contextlib import ExitStack

    from safetensors import safe_open

    origin = model._precompile_origin
    if origin is None or not Path(origin[0]).is_dir():
        return None
    path, root = Path(origin[0]), origin[1]
    try:
        if root is None:
            stored = {k: path / f for k, f in
                      json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"].items()}
        else:
            stored = {k: Path(root) / f for k, f in _base_files(Path(root)).items()}
            stored[manifest.table.tensor] = path / manifest.table.file
    except (OSError, ValueError, KeyError, TypeError, PrecompileLoadError):
        return None
    changed: list[str] = []
    with ExitStack() as stack:
        opened: dict[Path, object] = {}

        def tensor(f: Path, name: str) -> torch.Tensor:
            if f not in opened:
                opened[f] = stack.enter_context(safe_open(f, framework="pt"))
            return opened[f].get_tensor(name)

        for name in sorted(n for n in saved_map if n != guard):
            if name not in stored:
                changed.append(name)
                continue
            try:
                new = tensor(out / saved_map[name], name)
                same = torch.equal(tensor(stored[name], name).to(new.dtype), new)
            except Exception:  # noqa: BLE001 - unreadable now: cannot vouch for it
                return None
            if not same:
                changed.append(name)
    return changed


def _entry_classes() -> dict[str, type]:
    """OUT_DIR's config and model classes for `trust_remote_code`, built on first use (see module doc)."""
    from transformers import PretrainedConfig, PreTrainedModel

    class PrecompiledConfig(PretrainedConfig):
        """The entry type for `trust_remote_code`: config.json holds the original model type (for AutoTokenizer
        without trust_remote_code), which transformers would otherwise warn does not match this class."""

        model_type = "precompiled"

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
            config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
            return cls.from_dict(config_dict, **kwargs)

    class PrecompiledForCausalLM(PreTrainedModel):
        """Entry point for `AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`."""

        config_class = PrecompiledConfig

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            """`load` with transformers' arguments: hub ones fetch OUT_DIR, the rest go to the original class's
            from_pretrained (see `load`); `base=`/`verify_base=` are `load`'s."""
            if args:
                raise PrecompileLoadError("from_pretrained: positional model arguments are not supported for a "
                                          "precompiled model; pass keywords")
            _refuse(kwargs)
            subfolder = kwargs.pop("subfolder", None) or ""
            path = Path(pretrained_model_name_or_path)
            if not path.is_dir():
                from huggingface_hub import snapshot_download

                hub = {k: kwargs[k] for k in ("revision", "cache_dir", "force_download", "local_files_only", "token")
                       if kwargs.get(k) is not None}
                path = Path(snapshot_download(str(pretrained_model_name_or_path), **hub))
            dtype = kwargs.pop("dtype", None)
            dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
            kwargs.pop("torch_dtype", None)
            return load(path / subfolder, dtype=None if dtype in (None, "auto") else dtype,
                        base=kwargs.pop("base", None), verify_base=bool(kwargs.pop("verify_base", False)),
                        **kwargs)

    classes = {"PrecompiledConfig": PrecompiledConfig, "PrecompiledForCausalLM": PrecompiledForCausalLM}
    for name, c in classes.items():
        c.__qualname__ = name
    return classes


def __getattr__(name: str) -> type:
    """`precompile_loader.PrecompiledConfig` / `.PrecompiledForCausalLM`, as config.json's auto_map names them."""
    if name in ("PrecompiledConfig", "PrecompiledForCausalLM"):
        globals().update(_entry_classes())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
