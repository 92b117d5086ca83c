"""`convert`: plan a conversion from SOURCE, then compute the table and write OUT_DIR.

Planning (resolve, profile, headers, shapes, output files and sizes) reads no
tensor data, so `--dry-run` and the real run report the same figures.

Two kinds of output: "full" (the source's tensors minus the eliminated ones, plus
the table) and "overlay" (the table alone, laid over the unchanged source at load
time; only the files holding the tensors layer 0 needs are fetched and read).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import __version__
from .card import CARD_FILE, SelfCheckSummary, write_card
from .errors import UserError
from .generation import write_generation_config
from .files import out_dir_lock, out_dir_target
from .layout import TABLE_FILE, TableLayout, table_file_header, table_layout
from .loader import FORMAT_VERSION, MANIFEST
from .precompute import compute_rows, layer0_tensor_names
from .profile_check import check_tensors
from .profiles import ModelSpec, Profile, Projection, builtin_profiles, resolve, select_profile
from .progress import Progress
from .selfcheck import SelfCheckResult, self_check as check_layer0
from .source import (ALLOW_PATTERNS, PartialCheckpoint, Source, blob_sha256, carried_files, check_native,
                     check_tokenizer, fetch_files, file_sha256, read_config, resolve_source, weight_map)
from .tensors import (DTYPE_NAMES, DTYPES, FLOAT_DTYPES, INDEX_NAME, SINGLE_NAME, Checkpoint, TensorInfo,
                      has_safetensors, mapped, open_checkpoint)
from .writer import (TMP_PREFIX, atomic_dir, check_free_space, check_out_dir, scratch_dir, share_file, write_json,
                     write_shard, write_table)

DTYPE_CHOICES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_CHOICES = {"float32": torch.float32, "float64": torch.float64}
LINK_MODES = ("auto", "reflink", "hardlink", "copy")
SHIM_FILE = "precompile_loader.py"
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]


@dataclass
class ShardPlan:
    source_file: str
    out_file: str | None  # None: every tensor in it is eliminated
    action: str  # "share" (unchanged file) or "rewrite" (without eliminated tensors / new dtype)
    keep: list[TensorInfo]
    eliminated: list[str]
    out_bytes: int


@dataclass
class ConversionPlan:
    source: Source
    config: dict
    profile: Profile
    spec: ModelSpec
    layout: TableLayout
    checkpoint: Checkpoint
    model_dtype: torch.dtype
    compute_dtype: torch.dtype
    shards: list[ShardPlan]
    carried: list[str]
    read_tensors: list[str]
    kind: str = "full"  # or "overlay": the table only, laid over the unchanged source at load time

    @property
    def table_bytes(self) -> int:
        return self.layout.vocab_size * self.layout.width * torch.empty((), dtype=self.model_dtype).element_size()

    @property
    def table_file_bytes(self) -> int:
        """The table file's tensor data: the table and the one-element guard (layout.table_file_header)."""
        return self.table_bytes + self.model_dtype.itemsize

    @property
    def out_bytes(self) -> int:
        return self.table_file_bytes + sum(s.out_bytes for s in self.shards)


@dataclass
class ConvertResult:
    out_dir: Path
    plan: ConversionPlan
    seconds: float
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    methods: dict[str, str] = field(default_factory=dict)  # shared shard -> reflink/copy/hardlink
    self_check: SelfCheckResult | None = None  # None: skipped (--no-self-check)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device} is not one of auto, cpu, cuda")
    return torch.device(device)


def _check_shape(ckpt: Checkpoint, name: str, shape: tuple[int, ...], what: str) -> None:
    info = ckpt.info(name)
    if tuple(info.shape) != tuple(shape):
        raise UserError(f"{ckpt.root / info.file}: tensor {name} has shape {list(info.shape)}, but config.json "
                        f"implies {list(shape)} ({what}); the config does not match the weights")
    if info.dtype not in FLOAT_DTYPES:
        raise UserError(f"{ckpt.root / info.file}: tensor {name} has dtype {info.dtype}; layer-0 weights must be "
                        f"float (F32, F16, BF16, F64)")


def _validate(spec: ModelSpec, ckpt: Checkpoint, layout: TableLayout) -> None:
    d = spec.hidden_size
    _check_shape(ckpt, spec.embedding_tensor, (spec.vocab_size, d), "vocab_size x hidden_size")
    norms = [spec.embedding_norm, spec.attn_norm]
    if spec.folds_ffn and spec.ffn:
        norms.append(spec.ffn.norm)
    for norm in norms:
        for t in (norm.weight, norm.bias) if norm else ():
            if t:
                _check_shape(ckpt, t, (d,), "hidden_size")
    from .layout import projection_width

    for p in spec.projections:
        w = projection_width(spec, p)
        src = "its width key" if p.width is not None else "heads and head_dim"
        d_in, into = (p.low_rank.rank, "low_rank.rank") if p.low_rank else (d, "hidden_size")
        _check_shape(ckpt, p.weight, (w, d_in), f"{p.role} width {w} from {src} x {into}")
        _check_inner(ckpt, p, d)
        if p.bias and p.bias in ckpt.tensors:
            _check_shape(ckpt, p.bias, (w,), f"{p.role} width")
        elif p.bias_required:
            ckpt.info(p.bias)
    for role in spec.qk_norms:
        heads = spec.qk_norm_heads(role)
        for t in spec.qk_norm_tensors(role):
            if spec.qk_norm_span == "projection":
                _check_shape(ckpt, t, (projection_width(spec, role),), f"{role} norm over the whole projection")
            elif tuple(ckpt.info(t).shape) != (heads, spec.head_dim):
                _check_shape(ckpt, t, (spec.head_dim,), f"{role} norm over head_dim")
    if spec.folds_ffn and spec.ffn:
        for ref in spec.ffn.refs():
            ckpt.info(ref[0])


def _check_inner(ckpt: Checkpoint, p: Projection, d: int) -> None:
    """The shapes of a projection's low-rank input, its norm and the norm over its leading outputs."""
    lr = p.low_rank
    if lr is not None:
        _check_shape(ckpt, lr.weight, (lr.rank, d), "low_rank.rank x hidden_size")
        if lr.bias and lr.bias in ckpt.tensors:
            _check_shape(ckpt, lr.bias, (lr.rank,), "low_rank.rank")
    for norm, n, what in ((lr.norm if lr else None, lr.rank if lr else 0, "low_rank.rank"),
                          (p.out_norm, p.out_norm_width, "out_norm.width")):
        for t in (norm.weight, norm.bias) if norm else ():
            if t:
                _check_shape(ckpt, t, (n,), what)


def plan_conversion(source: str, *, revision: str | None = None, profile: str | Profile | None = None,
                    dtype: str = "auto", compute_dtype: str = "float32", allow_pickle: bool = False,
                    scratch: Path | None = None, overlay: bool = False) -> ConversionPlan:
    """Everything a conversion will read, eliminate and write, from headers alone.

    With allow_pickle, a pickle-only checkpoint is first rewritten as safetensors into `scratch`
    (loaded with weights_only=True); the caller removes `scratch` afterwards.

    overlay=True fetches (hub) or opens (local) only the files that hold the tensors layer 0 needs.
    """
    if dtype != "auto" and dtype not in DTYPE_CHOICES:
        raise UserError(f"--dtype {dtype} is not one of auto, {', '.join(DTYPE_CHOICES)}")
    if compute_dtype not in COMPUTE_CHOICES:
        raise UserError(f"--compute-dtype {compute_dtype} is not one of {', '.join(COMPUTE_CHOICES)}")
    src = resolve_source(source, revision, weights=not overlay)
    config = read_config(src.root)
    shipped = builtin_profiles()
    check_native(config, src.root, {t for p in shipped for t in p.model_types})
    prof = select_profile(config, profile, shipped)
    spec = resolve(prof, config)
    if allow_pickle and src.id is not None and not has_safetensors(src.root):
        src = resolve_source(source, revision, ALLOW_PATTERNS + PICKLE_PATTERNS)
    ckpt = _layer0_checkpoint(src, spec) if overlay else open_checkpoint(src.root, allow_pickle, scratch)
    layout = table_layout(spec, frozenset(ckpt.tensors))
    check_tensors(prof, config, spec, ckpt.tensors, ckpt.root)  # names the profile key of a wrong name or size
    _validate(spec, ckpt, layout)
    check_tokenizer(src.root, spec.vocab_size)
    emb_dtype = ckpt.info(spec.embedding_tensor).dtype
    model_dtype = DTYPE_CHOICES[dtype] if dtype != "auto" else DTYPES[emb_dtype]
    if model_dtype not in DTYPE_CHOICES.values():
        raise UserError(f"the checkpoint's dtype {emb_dtype} is not supported as a model dtype; pass --dtype")
    out_dtype_name = DTYPE_NAMES[model_dtype]
    eliminated = set(layout.eliminated)
    shards = []
    for i, fname in enumerate([] if overlay else ckpt.files):
        tensors = [t for t in ckpt.tensors.values() if t.file == fname]
        keep = [t for t in tensors if t.name not in eliminated]
        gone = sorted(t.name for t in tensors if t.name in eliminated)
        converts = any(t.dtype in FLOAT_DTYPES and t.dtype != out_dtype_name for t in keep)
        out_name = "model-00001-of-00001.safetensors" if fname == SINGLE_NAME else fname.replace("/", "--")
        if not keep:
            shards.append(ShardPlan(fname, None, "drop", [], gone, 0))
            continue
        size = sum(t.numel * torch.empty((), dtype=DTYPES[out_dtype_name if t.dtype in FLOAT_DTYPES else t.dtype])
                   .element_size() for t in keep)
        action = "rewrite" if (gone or converts) else "share"  # out_bytes: tensor data, as index total_size
        shards.append(ShardPlan(fname, out_name, action, keep, gone, size))
    outs = [sh.out_file for sh in shards if sh.out_file]
    if len(set(outs)) != len(outs):  # a shard in a subfolder is written flat, as OUT_DIR holds plain names only
        dup = next(o for o in outs if outs.count(o) > 1)
        raise UserError(f"two weight files of {src.root} would both be written as {dup} in OUT_DIR (one is in a "
                        f"subfolder); rename one of them in the index")
    read = [spec.embedding_tensor] + layer0_tensor_names(spec, frozenset(ckpt.tensors))
    return ConversionPlan(src, config, prof, spec, layout, ckpt, model_dtype, COMPUTE_CHOICES[compute_dtype],
                          shards, carried_files(src.root), read, "overlay" if overlay else "full")


def _layer0_checkpoint(src: Source, spec: ModelSpec) -> PartialCheckpoint:
    """The files holding the embedding and layer 0's tensors, fetched (hub) after reading only the index."""
    wmap = weight_map(src)
    names = [spec.embedding_tensor] + layer0_tensor_names(spec, frozenset(wmap))
    fetch_files(src, sorted({wmap[n] for n in names if n in wmap}))
    return PartialCheckpoint(src.root, wmap, names)


FFN_BLOCK = 4096  # hidden units of a folded FFN cast to the compute dtype at a time


def _layer0_weights(plan: ConversionPlan, device: torch.device) -> dict[str, torch.Tensor]:
    """Layer 0's tensors for compute_rows: small ones in the compute dtype, a folded FFN's mapped."""
    spec, ckpt = plan.spec, plan.checkpoint
    streamed: set[str] = set()
    if spec.folds_ffn and spec.ffn is not None:
        streamed = {r for ref in (spec.ffn.up, spec.ffn.gate, spec.ffn.down) if ref for r in ref if r}
    weights = {}
    for n in layer0_tensor_names(spec, frozenset(ckpt.tensors)):
        if n in streamed:
            weights[n] = mapped(ckpt, n).to(device)  # stays in the stored dtype; a no-op on CPU
        else:
            weights[n] = ckpt.get(n).to(device=device, dtype=plan.compute_dtype)
    return weights


def _first_non_finite(out: torch.Tensor) -> int | None:
    """Index of the first row holding NaN/Inf, or None. The chunk's min and max screen it (NaN propagates
    through both, an Inf becomes one of them) in one pass without a copy; only a chunk that fails the
    screen is checked element by element."""
    if out.numel() == 0 or all(bool(torch.isfinite(m)) for m in torch.aminmax(out)):
        return None
    finite = torch.isfinite(out).all(dim=-1)
    return None if bool(finite.all()) else int((~finite).nonzero()[0, 0])


def _table_chunks(plan: ConversionPlan, device: torch.device, chunk_size: int, progress: Progress):
    """Table rows in vocabulary order, `chunk_size` rows at a time, in the model dtype on the CPU.

    Lazy: each chunk is read, computed and handed over before the next one is read, so memory
    holds a few chunks and layer 0's weights, never the table or the embedding.
    """
    spec, layout, ckpt = plan.spec, plan.layout, plan.checkpoint
    weights = _layer0_weights(plan, device)
    cuda = device.type == "cuda"
    vocab = layout.vocab_size
    n_chunks = -(-vocab // chunk_size)
    with progress.bar(n_chunks, "computing table", "chunks") as bar:
        for start in range(0, vocab, chunk_size):
            stop = min(vocab, start + chunk_size)
            rows = ckpt.rows(spec.embedding_tensor, start, stop)
            if cuda:  # pinned host buffers: the copies in and out run as DMA, not through pageable memory
                rows = rows.pin_memory().to(device, non_blocking=True)
            out = torch.empty((stop - start, layout.width), dtype=plan.model_dtype, device=device)
            compute_rows(spec, layout, rows, weights, plan.model_dtype, plan.compute_dtype, out=out,
                         ffn_block=FFN_BLOCK)
            del rows
            bad = _first_non_finite(out)
            if bad is not None:
                bad += start
                raise UserError(f"table row for token id {bad} is not finite (NaN or Inf): the embedding row or a "
                                f"layer-0 weight of {ckpt.root} holds NaN/Inf, or the values overflow "
                                f"{DTYPE_NAMES[plan.model_dtype]} (try --dtype float32)")
            if cuda:
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                host.copy_(out, non_blocking=True)
                torch.cuda.current_stream(device).synchronize()
                out = host
            yield out
            del out
            bar.update(1)


def _write_shards(plan: ConversionPlan, tmp: Path, link: str, progress: Progress,
                  cancel: threading.Event) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Share or rewrite every kept shard, reading each source file once; stops early on cancel.

    Returns how each shared shard was placed, and the sha256 of source and output shards: a shared
    shard has its source's bytes (one hash), a rewritten one is hashed as it is written, and the
    source is hashed in the same read (or not at all: a hub blob is named by its hash).
    """
    methods: dict[str, str] = {}
    src_hashes: dict[str, str] = {}
    out_hashes: dict[str, str] = {}
    with progress.bar(sum(s.out_bytes for s in plan.shards), "writing shards", "B") as bar:
        for s in plan.shards:
            if s.out_file is None:
                continue
            if cancel.is_set():
                break
            src = plan.checkpoint.root / s.source_file
            if s.action == "share":
                methods[s.out_file], out_hashes[s.out_file] = share_file(src, tmp / s.out_file, link)
                src_hashes[s.source_file] = out_hashes[s.out_file]
            else:
                known = blob_sha256(src)
                digest = None if known else hashlib.sha256()
                out_hashes[s.out_file] = write_shard(src, tmp / s.out_file, s.keep,
                                                     plan.checkpoint.metadata[s.source_file],
                                                     str(DTYPE_NAMES[plan.model_dtype]), digest)
                src_hashes[s.source_file] = known or digest.hexdigest()
            bar.update(s.out_bytes)
    return methods, src_hashes, out_hashes


PLACED = {"reflink": "cloned by reflink", "copy": "copied", "hardlink": "hard-linked"}


def describe_shards(plan: ConversionPlan, methods: dict[str, str]) -> str:
    """How the shards entered OUT_DIR, e.g. `shards: 1 rewritten (1004.2 MiB), 7 cloned by reflink (2637.5 MiB)`."""
    groups: dict[str, list[ShardPlan]] = {"rewritten": [s for s in plan.shards if s.action == "rewrite"]}
    for s in plan.shards:
        if s.out_file in methods:
            groups.setdefault(PLACED[methods[s.out_file]], []).append(s)
    return "shards: " + ", ".join(f"{len(g)} {what} ({sum(s.out_bytes for s in g) / 2**20:.1f} MiB)"
                                  for what, g in groups.items())


def _out_config(plan: ConversionPlan) -> dict:
    """OUT_DIR/config.json: the original config, entered through the shim's classes.

    The original model type lets AutoTokenizer and AutoConfig load OUT_DIR without trust_remote_code
    (transformers asks first only for model types it does not know). Plain AutoModelForCausalLM would
    then build the original class, and the table file's guard stops it (see layout.table_file_header).
    """
    cfg = {k: v for k, v in plan.config.items() if k not in ("torch_dtype", "auto_map", "architectures")}
    return {
        **cfg,
        "dtype": str(plan.model_dtype).removeprefix("torch."),
        "architectures": ["PrecompiledForCausalLM"],
        "auto_map": {"AutoConfig": "precompile_loader.PrecompiledConfig",
                     "AutoModelForCausalLM": "precompile_loader.PrecompiledForCausalLM"},
        "precompile": {
            "original_architectures": plan.config.get("architectures"),
            "load": "precompile.load(path), or from_pretrained(path, trust_remote_code=True); see precompile.json",
        },
    }


def build_manifest(plan: ConversionPlan, options: dict, source_files: dict[str, str],
                   outputs: dict[str, str], kind: str = "full", sizes: dict[str, int] | None = None) -> dict:
    spec, layout = plan.spec, plan.layout
    cfg = dict(plan.config)
    cfg.pop("torch_dtype", None)
    dtype_name = str(plan.model_dtype).removeprefix("torch.")
    cfg["dtype"] = dtype_name
    zero = [spec.ffn.module] if spec.folds_ffn and spec.ffn else []
    return {
        "format": "precompile",
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "kind": kind,
        "profile": {"name": plan.profile.name, "block": spec.block, "attention": spec.attention_kind,
                    "path": plan.profile.path, "text": plan.profile.text},
        "source": {**plan.source.describe(), "files": source_files, "config": cfg},
        "options": options,
        "table": {
            "file": TABLE_FILE,
            "tensor": layout.tensor_name,
            "guard": layout.guard,
            "shape": [layout.vocab_size, layout.width],
            "dtype": dtype_name,
            "columns": [c.as_dict() for c in layout.columns],
        },
        "loader": {
            "embedding_module": spec.embedding_module,
            "hidden_size": spec.hidden_size,
            "x_stop": layout.columns[0].stop if layout.x_in_table else 0,
            "keep_embedding": layout.keep_embedding,
            "identity_modules": list(spec.identity_modules),
            "zero_modules": zero,
            "attention_module": spec.attention_module,
        },
        "eliminated": list(layout.eliminated),
        "outputs": outputs,
        **({"output_sizes": sizes} if sizes is not None else {}),
    }


def _source_hashes_names(plan: ConversionPlan) -> list[str]:
    root = plan.source.root
    names = ["config.json", *plan.checkpoint.source_files, *plan.carried]
    if (root / INDEX_NAME).exists() and plan.checkpoint.files != [SINGLE_NAME]:
        names.append(INDEX_NAME)
    return sorted(set(names))


def _source_hashes(plan: ConversionPlan, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every source file; `known` holds hashes already computed while copying."""
    known = known or {}
    return {n: known.get(n) or file_sha256(plan.source.root / n) for n in _source_hashes_names(plan)}


def _sizes(tmp: Path, outputs: dict[str, str]) -> dict[str, int]:
    """Each output file's size: `batch` finds a truncated output from these without reading it."""
    return {n: (tmp / n).stat().st_size for n in outputs}


def convert(source: str, out_dir: str | os.PathLike, *, revision: str | None = None,
            profile: str | Profile | None = None,
            device: str = "auto", dtype: str = "auto", compute_dtype: str = "float32", chunk_size: int = 4096,
            force: bool = False, link: str = "auto", progress: Progress | None = None,
            allow_pickle: bool = False, overlay: bool = False, table: str | os.PathLike | None = None,
            self_check: bool = True) -> ConvertResult:
    """Convert SOURCE into OUT_DIR; OUT_DIR appears only when everything has been written.

    allow_pickle: read PyTorch *.bin/*.pt weights (with weights_only=True) when there are no safetensors.
    overlay=True writes only the table, config, tokenizer, manifest and shim (see `_write_overlay`).
    table: an already computed table file (an overlay's, for `materialize`) copied instead of computed.
    self_check: before OUT_DIR appears, compare layer 0 with transformers' own model (precompile.selfcheck).
    """
    progress = progress or Progress(quiet=True)
    if chunk_size < 1:
        raise UserError(f"--chunk-size must be at least 1, got {chunk_size}")
    if link not in LINK_MODES:
        raise UserError(f"--link {link} is not one of {', '.join(LINK_MODES)}")
    t0 = time.monotonic()
    dev = pick_device(device)
    out_dir = out_dir_target(out_dir)
    local = Path(source).expanduser()
    if local.is_dir():  # before anything is read or created: OUT_DIR must not be or hold the source
        _check_apart(local, out_dir)
    check_out_dir(out_dir, force)
    with out_dir_lock(out_dir, progress.log), \
            scratch_dir(out_dir.parent / f"{TMP_PREFIX}{out_dir.name}-{os.getpid()}-source") as scratch:
        return _convert(source, out_dir, scratch, revision=revision, profile=profile, dev=dev, dtype=dtype,
                        compute_dtype=compute_dtype, chunk_size=chunk_size, force=force, link=link,
                        progress=progress, allow_pickle=allow_pickle, overlay=overlay, table=table, t0=t0,
                        self_check=self_check)


def _check_apart(source_root: Path, out_dir: Path) -> None:
    src, out = source_root.resolve(), out_dir.resolve()
    if out == src or src in out.parents:
        raise UserError(f"OUT_DIR {out_dir} is the source directory or inside it; choose another OUT_DIR")
    if out in src.parents:
        raise UserError(f"OUT_DIR {out_dir} contains the source {source_root}; replacing it would delete the "
                        f"source, choose another OUT_DIR")


def _needed_bytes(plan: ConversionPlan, link: str) -> int:
    """Bytes OUT_DIR will take: shared shards count unless hard-linked (a reflink may fall back to a copy)."""
    shared = sum(s.out_bytes for s in plan.shards if s.action == "share") if link == "hardlink" else 0
    carried = sum((plan.source.root / n).stat().st_size for n in plan.carried)
    return plan.out_bytes - shared + carried + (1 << 20)  # + index, config, manifest, shim


def _convert(source: str, out_dir: Path, scratch: Path, *, revision, profile, dev, dtype, compute_dtype,
             chunk_size, force, link, progress, allow_pickle, overlay, table, t0, self_check) -> ConvertResult:
    plan = plan_conversion(source, revision=revision, profile=profile, dtype=dtype, compute_dtype=compute_dtype,
                           allow_pickle=allow_pickle, scratch=scratch, overlay=overlay)
    _check_apart(plan.source.root, out_dir)
    check_free_space(check_out_dir(out_dir, force), _needed_bytes(plan, link), f"the planned output of {out_dir}")
    progress.log(describe_plan(plan, dev))
    options = {"dtype": str(plan.model_dtype).removeprefix("torch."), "compute_dtype": compute_dtype}
    if plan.checkpoint.source_files != plan.checkpoint.files:
        options["pickle"] = "loaded with torch.load(weights_only=True)"
    result = ConvertResult(out_dir, plan, 0.0)
    if overlay:
        return _write_overlay(plan, out_dir, options, force, result, t0,
                              lambda tmp: _write_table_file(plan, tmp, dev, chunk_size, progress, table), progress,
                              self_check)
    with atomic_dir(out_dir, force, progress.log) as tmp:
        # Shards are copied and hashed in the background while the table is computed, on CUDA and on the
        # CPU alike: the copies mostly wait on the page cache and the disk, so beside the matmuls they cost
        # far less than after them (benchmarks/bench_convert.py: 17.5 s against 22.5 s on 2 cores).
        cancel = threading.Event()
        with ThreadPoolExecutor(1, thread_name_prefix="precompile-shards") as pool:
            shards = pool.submit(_write_shards, plan, tmp, link, progress, cancel)
            try:
                table_hash = _write_table_file(plan, tmp, dev, chunk_size, progress, table)
            except BaseException:
                cancel.set()
                raise
            result.methods, src_hashes, out_hashes = shards.result()
        progress.log(describe_shards(plan, result.methods))
        out_hashes[TABLE_FILE] = table_hash
        index_map = {plan.layout.tensor_name: TABLE_FILE, plan.layout.guard: TABLE_FILE}
        total = plan.table_file_bytes
        for s in plan.shards:
            if s.out_file is not None:
                index_map.update({t.name: s.out_file for t in s.keep})
                total += s.out_bytes
        write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                      "weight_map": dict(sorted(index_map.items()))})
        _finish(plan, tmp, options, result, progress, self_check, out_hashes, src_hashes)
    result.seconds = time.monotonic() - t0
    progress.log(f"wrote {out_dir} ({plan.out_bytes / 2**20:.1f} MiB) in {result.seconds:.1f}s")
    return result


def _write_table_file(plan: ConversionPlan, tmp: Path, dev: torch.device, chunk_size: int, progress: Progress,
                      table: str | os.PathLike | None) -> str:
    """Compute the table into tmp, or rewrite a given one after checking it is this plan's table; its sha256.

    A given table (an overlay's, for `materialize`) is streamed into a new file rather than copied, so
    the file is byte for byte what computing it here writes, guard and metadata included.
    """
    lay = plan.layout
    dtype = DTYPE_NAMES[plan.model_dtype]
    entries, metadata = table_file_header(lay, dtype, plan.model_dtype.itemsize)
    if table is None:
        chunks = _table_chunks(plan, dev, chunk_size, progress)
    else:
        chunks = _given_table(Path(table), entries, chunk_size)
    return write_table(tmp / TABLE_FILE, lay.tensor_name, (lay.vocab_size, lay.width), plan.model_dtype, chunks,
                       extra=entries[1:], metadata=metadata)


def _given_table(path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], chunk_size: int) -> Iterator:
    """The rows of a table file written for this plan (with or without the guard), chunk by chunk."""
    from safetensors import safe_open

    from .tensors import read_header

    infos, _ = read_header(path)
    name, dtype, shape, _ = entries[0]
    info = infos.get(name)
    if info is None or set(infos) - {e[0] for e in entries} or (tuple(info.shape), info.dtype) != (shape, dtype):
        raise UserError(f"{path} does not hold the table this source needs ({name} {list(shape)} {dtype}); "
                        f"the overlay and the base do not belong together")

    def rows():
        with safe_open(path, framework="pt") as f:
            table = f.get_slice(name)
            for start in range(0, shape[0], chunk_size):
                yield table[start:start + chunk_size]

    return rows()


def _write_overlay(plan: ConversionPlan, out_dir: Path, options: dict, force: bool, result: ConvertResult,
                   t0: float, write_table_file, progress: Progress, self_check: bool) -> ConvertResult:
    """OUT_DIR for an overlay: table, config, tokenizer, shim and a manifest that pins the base.

    The manifest records sha256 of every source file read (so a changed base is refused), plus each
    file's size, and for local sources its mtime, so that loading can check the base without reading it.
    """
    with atomic_dir(out_dir, force, progress.log) as tmp:
        write_table_file(tmp)
        _finish(plan, tmp, options, result, progress, self_check)
    result.seconds = time.monotonic() - t0
    progress.log(f"wrote overlay {out_dir} ({plan.table_bytes / 2**20:.1f} MiB) in {result.seconds:.1f}s; "
                 f"it loads over {plan.source.id or plan.source.path}")
    return result


def _self_check(plan: ConversionPlan, tmp: Path, progress: Progress) -> SelfCheckResult:
    """Layer 0 of the conversion in tmp against transformers' own (raises VerificationError: tmp is removed)."""
    progress.log("self-check: layer 0 against transformers' own model")
    result = check_layer0(plan, tmp)
    progress.log(result.summary())
    return result


def _finish(plan: ConversionPlan, tmp: Path, options: dict, result: ConvertResult, progress: Progress,
            self_check: bool, out_hashes: dict[str, str] | None = None,
            src_hashes: dict[str, str] | None = None) -> None:
    """What a full conversion and an overlay both write once their weights are in tmp, in this order: the
    carried and derived files, the manifest (an overlay's also pins the base), the self-check (it loads
    through the manifest), then the card that reports it. `*_hashes`: sha256s already computed while copying."""
    for name in plan.carried:
        share_file(plan.source.root / name, tmp / name, "copy")
    write_generation_config(plan.source.root, plan.carried, tmp)
    write_json(tmp / "config.json", _out_config(plan))
    (tmp / SHIM_FILE).write_bytes((Path(__file__).parent / "loader.py").read_bytes())
    progress.log("hashing the source files read and the output files")
    known = out_hashes or {}
    outputs = {p.name: known.get(p.name) or file_sha256(p) for p in sorted(tmp.iterdir())}
    manifest = build_manifest(plan, options, _source_hashes(plan, src_hashes), outputs, kind=plan.kind,
                              sizes=_sizes(tmp, outputs))
    if plan.kind == "overlay":
        manifest["source"].update(_base_stats(plan))
    write_json(tmp / MANIFEST, manifest)
    check = result.self_check = _self_check(plan, tmp, progress) if self_check else None
    outputs[CARD_FILE] = write_card(tmp, plan, SelfCheckSummary(check.passed, check.outcome()) if check else None)
    result.files = outputs


def _base_stats(plan: ConversionPlan) -> dict:
    """Sizes (and, for a local source, mtimes) of the base's files present now: the loader's cheap check."""
    root = plan.source.root
    names = set(_source_hashes_names(plan))
    if (root / INDEX_NAME).exists() and not (root / SINGLE_NAME).exists():
        from .tensors import read_index

        names |= set(read_index(root / INDEX_NAME).values())
    sizes, mtimes = {}, {}
    for n in sorted(names):
        p = root / n
        if p.exists():
            st = p.stat()
            sizes[n] = st.st_size
            mtimes[n] = st.st_mtime_ns
    return {"sizes": sizes, **({"mtimes": mtimes} if plan.source.id is None else {})}


def describe_plan(plan: ConversionPlan, device: torch.device | None = None) -> str:
    """A few lines that tell the user what the conversion does before it starts."""
    s, lay = plan.spec, plan.layout
    src = plan.source.id + (f"@{plan.source.revision[:12]}" if plan.source.revision else "") if plan.source.id \
        else plan.source.path
    cols = ", ".join(f"{c.name}[{c.start}:{c.stop}]" for c in lay.columns)
    n_elim = sum(plan.checkpoint.info(n).numel for n in lay.eliminated)
    lines = [
        f"source: {src}",
        f"profile: {plan.profile.name} ({s.block} block, {s.attention_kind}: {s.num_heads} heads, "
        f"{s.num_kv_heads} kv heads, head_dim {s.head_dim}, hidden {s.hidden_size}, vocab {s.vocab_size})",
        f"table: [{lay.vocab_size}, {lay.width}] {str(plan.model_dtype).removeprefix('torch.')} "
        f"({plan.table_bytes / 2**20:.1f} MiB): {cols}",
        f"kind: {plan.kind}" + (" (table only; loads over the source, which is not copied)"
                                if plan.kind == "overlay" else ""),
        f"eliminated: {len(lay.eliminated)} tensors, {n_elim:,} weights"
        + (" (embedding kept for the tied LM head)" if lay.keep_embedding else ""),
    ]
    if device is not None:
        lines.append(f"compute: {str(plan.compute_dtype).removeprefix('torch.')} on {device}")
    return "\n".join(lines)
