"""`convert`: execute a conversion plan (plan/conversion_plan.py): compute the table and write OUT_DIR.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

import torch

from precompile.check.self_check import Reference, SelfCheckResult, compare, reference_layer0
from precompile.check.reference_model import BUILD_LOCK, quiet_transformers
from precompile.compute.device import pick_device
from precompile.compute.table_math import compute_rows, stack_projections
from precompile.errors import UserError
from precompile.io.file_safety import write_json
from precompile.io.hashed_copy import blob_sha256, file_sha256, share_file
from precompile.io.generation_config import GENERATION_CONFIG, check_generation_config, write_generation_config
from precompile.io.out_dir import OutDir
from precompile.io.process_memory import heap_kept
from precompile.io.progress import Progress
from precompile.io.safetensors_files import DTYPE_NAMES, INDEX_NAME, dtype_name, mapped, read_header, read_index
from precompile.io.shard_writer import write_shard, write_table
from precompile.io.weight_file_names import weight_index
from precompile.loader import (
    MANIFEST, LoaderRecord, Manifest, ProfileRecord, SourceRecord, TableRecord, config_from_dict, converted_config)
from precompile.plan.conversion_plan import ConversionPlan, ShardPlan, describe_plan, plan_conversion, recorded_options
from precompile.plan.convert_options import ConvertOptions
from precompile.plan.table_layout import TABLE_FILE, layer0_tensor_names, table_file_header
from precompile.publish.card import CARD_FILE, SelfCheckSummary, write_card
from precompile.version import __version__

SHIM_FILE = "precompile_loader.py"


@dataclass
class ConvertResult:
    out_dir: Path
    plan: ConversionPlan
    seconds: float
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    methods: dict[str, str] = field(default_factory=dict)  # shared shard -> reflink/copy/hardlink
    self_check: SelfCheckResult | None = None  # None: skipped (--no-self-check)


FFN_BLOCK = 4096  # hidden units of a folded FFN cast to the compute dtype at a time

T = TypeVar("T")


class _Ahead(Generic[T]):
    """fn(*args) on a daemon thread, started at once; `result()` waits for it and re-raises what it raised.

    A conversion that fails does not wait for it: what runs here only reads, and ends on its own.
    """

    def __init__(self, name: str, fn: Callable[..., T], *args: Any) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised by result(), in the caller's thread
                self._error = e

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def _layer0_weights(plan: ConversionPlan, device: torch.device) -> dict[str, torch.Tensor]:
    """Layer 0's tensors for compute_rows: small ones in the compute dtype (the projections that one matmul
    computes stacked), a folded FFN's mapped."""
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
    return stack_projections(spec, weights)


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


def _config_as_written(plan: ConversionPlan) -> dict:
    """The source's config.json with the output's dtype (transformers 5 names it `dtype`)."""
    cfg = {k: v for k, v in plan.config.items() if k != "torch_dtype"}
    cfg["dtype"] = dtype_name(plan.model_dtype)
    return cfg


def _out_config(plan: ConversionPlan) -> dict:
    """OUT_DIR/config.json: the original config, entered through the shim's classes (see
    loader.converted_config: plain AutoModelForCausalLM stops with the way out)."""
    return converted_config(_config_as_written(plan), plan.config.get("architectures"))


def build_manifest(plan: ConversionPlan, options: dict, source_files: dict[str, str],
                   outputs: dict[str, str], kind: str = "full", sizes: dict[str, int] | None = None) -> Manifest:
    spec, layout = plan.spec, plan.layout
    cfg = _config_as_written(plan)
    dtype = cfg["dtype"]
    zero = (spec.ffn.module,) if spec.folds_ffn and spec.ffn else ()
    return Manifest(
        tool_version=__version__,
        kind=kind,
        profile=ProfileRecord(plan.profile.name, spec.block, spec.attention_kind, plan.profile.path,
                              plan.profile.text),
        source=SourceRecord(config=cfg, files=source_files, **plan.source.describe()),
        options=options,
        table=TableRecord(TABLE_FILE, layout.tensor_name, (layout.vocab_size, layout.width), dtype, layout.columns,
                          layout.guard),
        loader=LoaderRecord(spec.embedding_module, spec.attention_module, spec.hidden_size,
                            layout.columns[0].stop if layout.x_in_table else 0, layout.keep_embedding,
                            tuple(spec.identity_modules), zero, layout.x_scale),
        eliminated=layout.eliminated,
        outputs=outputs,
        output_sizes=sizes,
    )


def _source_hashes_names(plan: ConversionPlan) -> list[str]:
    root = plan.source.root
    names = ["config.json", *plan.checkpoint.source_files, *plan.carried]
    if weight_index(root) is not None:
        names.append(INDEX_NAME)
    return sorted(set(names))


def _source_hashes(plan: ConversionPlan, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every source file; `known` holds hashes already computed while copying."""
    known = known or {}
    return {n: known.get(n) or file_sha256(plan.source.root / n) for n in _source_hashes_names(plan)}


def _sizes(tmp: Path, outputs: dict[str, str]) -> dict[str, int]:
    """Each output file's size: `batch` finds a truncated output from these without reading it."""
    return {n: (tmp / n).stat().st_size for n in outputs}


def convert(source: str, out_dir: str | os.PathLike, options: ConvertOptions | None = None, *, force: bool = False,
            progress: Progress | None = None, table: str | os.PathLike | None = None, **kwargs: Any) -> ConvertResult:
    """Convert SOURCE into OUT_DIR; OUT_DIR appears only when everything has been written.

    options: a ConvertOptions (precompile/plan/convert_options.py), or its fields as keywords (`chunk_size=64`,
    `allow_pickle=True`, `overlay=True`, ...), which replace those of a given `options`.
    force: replace an existing OUT_DIR, only once the new one is complete.
    table: an already computed table file (an overlay's, for `materialize`) whose rows are streamed into
    OUT_DIR's table file instead of computed.
    """
    opts = ConvertOptions.build(options, **kwargs)
    progress = progress or Progress(quiet=True)
    t0 = time.monotonic()
    dev = pick_device(opts.device)
    out = OutDir.resolve(out_dir, force)
    local = Path(source).expanduser()
    if local.is_dir():  # before anything is read or created: OUT_DIR must not be or hold the source
        _check_apart(local, out.path)
    out.check()
    with out.lock(progress.log), out.scratch() as scratch:
        return _convert(source, out, scratch, opts, dev, progress=progress, table=table, t0=t0)


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


def _convert(source: str, out: OutDir, scratch: Path, opts: ConvertOptions, dev: torch.device, *,
             progress: Progress, table: str | os.PathLike | None, t0: float) -> ConvertResult:
    plan = plan_conversion(source, scratch=scratch, **opts.compared())
    if opts.self_check:  # transformers is imported anyway; --no-self-check leaves it to the JSON checks of planning
        with BUILD_LOCK:  # transformers' lazy imports are not thread-safe (batch --jobs)
            check_generation_config(plan.source.root, plan.carried)
    out_dir = out.path
    _check_apart(plan.source.root, out_dir)
    out.check_space(_needed_bytes(plan, opts.link), f"the planned output of {out_dir}")
    progress.log(describe_plan(plan, dev))
    result = ConvertResult(out_dir, plan, 0.0)
    imported = _import_ahead(plan, opts.self_check)
    reference = _ReferenceAhead(plan, opts.self_check)
    if dev.type == "cuda" or table is not None:  # the table leaves the CPU free
        reference.start("table")
    with out.write(progress.log) as tmp:
        if plan.kind == "overlay":  # the table alone: the manifest pins the base it loads over (see _finish)
            out_hashes = {TABLE_FILE: _write_table_file(plan, tmp, dev, opts.chunk_size, progress, table)}
            src_hashes = None
        else:
            result.methods, src_hashes, out_hashes = _write_weights(plan, tmp, dev, opts, progress, table,
                                                                    after_table=lambda: reference.start("shards"))
        imported.result()  # before this thread imports any of it
        _finish(plan, tmp, recorded_options(plan, opts), result, progress, reference, out_hashes, src_hashes)
    result.seconds = time.monotonic() - t0
    if plan.kind == "overlay":
        progress.log(f"wrote overlay {out_dir} ({plan.table_bytes / 2**20:.1f} MiB) in {result.seconds:.1f}s; "
                     f"it loads over {plan.source.id or plan.source.path}")
    else:
        progress.log(f"wrote {out_dir} ({plan.out_bytes / 2**20:.1f} MiB) in {result.seconds:.1f}s")
    return result


class _ReferenceAhead:
    """The self-check's reference (transformers' own layer 0: most of the check's arithmetic, reading only the
    source) on a thread, beside the work that leaves the CPU free: the shard copies still running after a CPU
    table, or the whole table on CUDA (or streamed from a given file). Memory: one layer-0 module at a time,
    after the CPU table's chunks are freed."""

    def __init__(self, plan: ConversionPlan, enabled: bool) -> None:
        self.plan, self.enabled = plan, enabled
        self.beside = ""
        self._ahead: _Ahead[Reference] | None = None

    def start(self, beside: str) -> None:
        if self.enabled and self._ahead is None:
            self.beside = beside
            self._ahead = _Ahead("precompile-self-check", reference_layer0, self.plan)

    def result(self) -> Reference:
        self.start("")  # an overlay's CPU table: nothing left to run beside
        assert self._ahead is not None
        return self._ahead.result()


def _import_ahead(plan: ConversionPlan, self_check: bool) -> _Ahead[None]:
    """Import what the end of the conversion needs from transformers while the weights are written.

    The self-check's model class (its modeling module pulls in much of transformers and torch) and the
    generation config take seconds to import, once, after the table: on this thread they overlap with
    it instead. Only imports, nothing written; a failure here is left to the real use to report. Nothing
    is imported that the conversion does not use (--no-self-check with a generation config: nothing).
    """
    generation = GENERATION_CONFIG not in plan.carried

    def run() -> None:
        if not (self_check or generation):
            return
        try:
            with BUILD_LOCK, quiet_transformers():
                if generation:
                    from transformers import GenerationConfig  # noqa: F401 - for write_generation_config
                if self_check:
                    from transformers import AutoModelForCausalLM

                    AutoModelForCausalLM._model_mapping[type(config_from_dict(plan.config))]
        except Exception:  # noqa: BLE001, S110 - the self-check or the generation config reports it
            pass

    return _Ahead("precompile-imports", run)


def _write_weights(plan: ConversionPlan, tmp: Path, dev: torch.device, opts: ConvertOptions, progress: Progress,
                   table: str | os.PathLike | None, after_table: Callable[[], None] = lambda: None,
                   ) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """A full conversion's weight files and index in tmp: how each shared shard was placed, and the sha256 of
    the source files read and of the files written.

    Shards are copied and hashed in the background while the table is computed, on CUDA and on the CPU
    alike: the copies mostly wait on the page cache and the disk, so beside the matmuls they cost far less
    than after them (benchmarks/bench_convert.py). `after_table` runs once the table is written, while
    the last shards may still be copied.
    """
    cancel = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="precompile-shards") as pool:
        shards = pool.submit(_write_shards, plan, tmp, opts.link, progress, cancel)
        try:
            table_hash = _write_table_file(plan, tmp, dev, opts.chunk_size, progress, table)
        except BaseException:
            cancel.set()
            raise
        after_table()
        methods, src_hashes, out_hashes = shards.result()
    progress.log(describe_shards(plan, methods))
    out_hashes[TABLE_FILE] = table_hash
    index_map = {plan.layout.tensor_name: TABLE_FILE, plan.layout.guard: TABLE_FILE}
    total = plan.table_file_bytes
    for s in plan.shards:
        if s.out_file is not None:
            index_map.update({t.name: s.out_file for t in s.keep})
            total += s.out_bytes
    write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total},
                                  "weight_map": dict(sorted(index_map.items()))})
    return methods, src_hashes, out_hashes


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
    with heap_kept():
        return write_table(tmp / TABLE_FILE, lay.tensor_name, (lay.vocab_size, lay.width), plan.model_dtype,
                           chunks, extra=entries[1:], metadata=metadata)


def _given_table(path: Path, entries: list[tuple[str, str, tuple[int, ...], int]], chunk_size: int) -> Iterator:
    """The rows of a table file written for this plan (with or without the guard), chunk by chunk."""
    from safetensors import safe_open

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


def _self_check(reference: _ReferenceAhead, tmp: Path, progress: Progress) -> SelfCheckResult:
    """Layer 0 of the conversion in tmp against transformers' own (raises VerificationError: tmp is removed)."""
    progress.log("self-check: layer 0 against transformers' own model")
    t0 = time.monotonic()
    ref = reference.result()
    if reference.beside:
        progress.log(f"self-check: transformers' own layer 0 in {ref.seconds:.1f}s, started beside the "
                     f"{reference.beside}; {time.monotonic() - t0:.1f}s of it after the weights were written")
    result = compare(ref, tmp)
    progress.log(result.summary())
    return result


def _finish(plan: ConversionPlan, tmp: Path, options: dict, result: ConvertResult, progress: Progress,
            reference: _ReferenceAhead, out_hashes: dict[str, str] | None = None,
            src_hashes: dict[str, str] | None = None) -> None:
    """What a full conversion and an overlay both write once their weights are in tmp, in this order: the
    carried and derived files, the manifest (an overlay's also pins the base), the self-check (it loads
    through the manifest), then the card that reports it. `*_hashes`: sha256s already computed while copying."""
    for name in plan.carried:
        share_file(plan.source.root / name, tmp / name, "copy")
    with BUILD_LOCK:  # transformers' lazy imports are not thread-safe (batch --jobs)
        write_generation_config(plan.source.root, plan.carried, tmp)
    write_json(tmp / "config.json", _out_config(plan))
    (tmp / SHIM_FILE).write_bytes((Path(__file__).parent / "loader.py").read_bytes())
    progress.log("hashing the source files read and the output files")
    known = out_hashes or {}
    outputs = {p.name: known.get(p.name) or file_sha256(p) for p in sorted(tmp.iterdir())}
    manifest = build_manifest(plan, options, _source_hashes(plan, src_hashes), outputs, kind=plan.kind,
                              sizes=_sizes(tmp, outputs))
    if plan.kind == "overlay":
        manifest = replace(manifest, source=replace(manifest.source, **_base_stats(plan)))
    write_json(tmp / MANIFEST, manifest.to_dict())
    check = result.self_check = _self_check(reference, tmp, progress) if reference.enabled else None
    outputs[CARD_FILE] = write_card(tmp, plan, SelfCheckSummary(check.passed, check.outcome()) if check else None)
    result.files = outputs


def _base_stats(plan: ConversionPlan) -> dict:
    """Sizes (and, for a local source, mtimes) of the base's files present now: the loader's cheap check."""
    root = plan.source.root
    names = set(_source_hashes_names(plan))
    index = weight_index(root)
    if index is not None:
        names |= set(read_index(index).values())
    sizes, mtimes = {}, {}
    for n in sorted(names):
        p = root / n
        if p.exists():
            st = p.stat()
            sizes[n] = st.st_size
            mtimes[n] = st.st_mtime_ns
    return {"sizes": sizes, **({"mtimes": mtimes} if plan.source.id is None else {})}
