"""Planning a conversion: everything `convert` will read, eliminate and write, from headers alone.

Planning resolves the source, picks the profile, reads the safetensors headers, checks the shapes and
lays out the output files and their sizes; it reads no tensor data (except a pickle checkpoint's, which is
first rewritten as safetensors), so `--dry-run`, `plan`'s exact column, `batch`'s skip rule and the real
run report the same figures. Executing a plan is convert.py's job.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from precompile.errors import UserError
from precompile.io.out_dir import TMP_PREFIX, scratch_dir
from precompile.io.safetensors_files import (
    DTYPE_NAMES, DTYPES, FLOAT_DTYPES, SINGLE_NAME, TORCH_DTYPES, Checkpoint, PartialCheckpoint, TensorInfo,
    dtype_name, element_size, has_safetensors, open_checkpoint, output_dtype)
from precompile.io.source import (
    ALLOW_PATTERNS, Source, carried_files, check_native, check_source_files, check_tokenizer, fetch_files,
    read_config, resolve_source, weight_map)
from precompile.plan.convert_options import ConvertOptions, check_value, meta
from precompile.plan.profile_fit import check_tensors
from precompile.plan.table_layout import TableLayout, projection_width, table_file_header, table_inputs, table_layout
from precompile.profiles.catalog import builtin_profiles, match_keys, match_names, select_profile
from precompile.profiles.model_spec import ModelSpec, Projection
from precompile.profiles.profile_resolution import Profile, resolve

DTYPE_CHOICES = {n: TORCH_DTYPES[n] for n in meta("dtype").choices if n != "auto"}
COMPUTE_CHOICES = {n: TORCH_DTYPES[n] for n in meta("compute_dtype").choices}
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
        """The table file's tensor data: the table and the one-element guard."""
        entries, _ = table_file_header(self.layout, DTYPE_NAMES[self.model_dtype], self.model_dtype.itemsize)
        return sum(e[3] for e in entries)

    @property
    def out_bytes(self) -> int:
        return self.table_file_bytes + sum(s.out_bytes for s in self.shards)


def _check_shape(ckpt: Checkpoint, name: str, shape: tuple[int, ...], what: str) -> None:
    info = ckpt.info(name)
    if tuple(info.shape) != tuple(shape):
        raise UserError(f"{ckpt.root / info.file}: tensor {name} has shape {list(info.shape)}, but config.json "
                        f"implies {list(shape)} ({what}); the config does not match the weights")
    if info.dtype not in FLOAT_DTYPES:
        raise UserError(f"{ckpt.root / info.file}: tensor {name} has dtype {info.dtype}; layer-0 weights must be "
                        f"float (F32, F16, BF16, F64)")


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


def _validate(spec: ModelSpec, ckpt: Checkpoint) -> None:
    d = spec.hidden_size
    _check_shape(ckpt, spec.embedding_tensor, (spec.vocab_size, d), "vocab_size x hidden_size")
    norms = [spec.embedding_norm, spec.attn_norm]
    if spec.folds_ffn and spec.ffn:
        norms.append(spec.ffn.norm)
    for norm in norms:
        for t in (norm.weight, norm.bias) if norm else ():
            if t:
                _check_shape(ckpt, t, (d,), "hidden_size")
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


def plan_conversion(source: str, *, revision: str | None = None, profile: str | Profile | None = None,
                    dtype: str = "auto", compute_dtype: str = "float32", allow_pickle: bool = False,
                    scratch: Path | None = None, overlay: bool = False) -> ConversionPlan:
    """Everything a conversion will read, eliminate and write, from headers alone.

    With allow_pickle, a pickle-only checkpoint is first rewritten as safetensors into `scratch`
    (loaded with weights_only=True); the caller removes `scratch` afterwards.

    overlay=True fetches (hub) or opens (local) only the files that hold the tensors layer 0 needs.
    """
    check_value("dtype", dtype)
    check_value("compute_dtype", compute_dtype)
    src = resolve_source(source, revision, weights=not overlay)
    config = read_config(src.root)
    check_source_files(src.root)
    shipped = builtin_profiles(validate=False, mentioning=match_names(config))  # only reads those that can match
    check_native(config, src.root, {t for p in shipped for t in match_keys(p, "model_types")})
    prof = select_profile(config, profile)
    spec = resolve(prof, config)
    if allow_pickle and src.id is not None and not has_safetensors(src.root):
        src = resolve_source(source, revision, ALLOW_PATTERNS + PICKLE_PATTERNS)
    ckpt = _layer0_checkpoint(src, spec) if overlay else open_checkpoint(src.root, allow_pickle, scratch)
    layout = table_layout(spec, frozenset(ckpt.tensors))
    check_tensors(prof, config, spec, ckpt.tensors, ckpt.root)  # names the profile key of a wrong name or size
    _validate(spec, ckpt)
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
        converts = any(output_dtype(t.dtype, out_dtype_name) != t.dtype for t in keep)
        out_name = "model-00001-of-00001.safetensors" if fname == SINGLE_NAME else fname.replace("/", "--")
        if not keep:
            shards.append(ShardPlan(fname, None, "drop", [], gone, 0))
            continue
        size = sum(t.numel * element_size(output_dtype(t.dtype, out_dtype_name)) for t in keep)
        action = "rewrite" if (gone or converts) else "share"  # out_bytes: tensor data, as index total_size
        shards.append(ShardPlan(fname, out_name, action, keep, gone, size))
    outs = [sh.out_file for sh in shards if sh.out_file]
    if len(set(outs)) != len(outs):  # a shard in a subfolder is written flat, as OUT_DIR holds plain names only
        dup = next(o for o in outs if outs.count(o) > 1)
        raise UserError(f"two weight files of {src.root} would both be written as {dup} in OUT_DIR (one is in a "
                        f"subfolder); rename one of them in the index")
    read = table_inputs(spec, frozenset(ckpt.tensors))
    return ConversionPlan(src, config, prof, spec, layout, ckpt, model_dtype, COMPUTE_CHOICES[compute_dtype],
                          shards, carried_files(src.root), read, "overlay" if overlay else "full")


def _layer0_checkpoint(src: Source, spec: ModelSpec) -> PartialCheckpoint:
    """The files holding the embedding and layer 0's tensors, fetched (hub) after reading only the index."""
    wmap = weight_map(src)
    names = table_inputs(spec, frozenset(wmap))
    fetch_files(src, sorted({wmap[n] for n in names if n in wmap}))
    return PartialCheckpoint(src.root, wmap, names)


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
        f"table: [{lay.vocab_size}, {lay.width}] {dtype_name(plan.model_dtype)} "
        f"({plan.table_bytes / 2**20:.1f} MiB): {cols}",
        f"kind: {plan.kind}" + (" (table only; loads over the source, which is not copied)"
                                if plan.kind == "overlay" else ""),
        f"eliminated: {len(lay.eliminated)} tensors, {n_elim:,} weights"
        + (" (embedding kept for the tied LM head)" if lay.keep_embedding else ""),
    ]
    if device is not None:
        lines.append(f"compute: {dtype_name(plan.compute_dtype)} on {device}")
    return "\n".join(lines)


@contextmanager
def planned(source: str, options: ConvertOptions) -> Iterator[ConversionPlan]:
    """The plan of converting SOURCE with these options, for a look before (or instead of) converting: a
    pickle checkpoint's safetensors view (allow_pickle) lives in a scratch directory until the block ends."""
    with scratch_dir(Path(tempfile.mkdtemp(prefix=TMP_PREFIX))) as scratch:
        yield plan_conversion(source, scratch=scratch / "view", **options.compared())


def recorded_options(plan: ConversionPlan, options: ConvertOptions) -> dict:
    """The manifest's `options`: the recorded options as planning resolved them (dtype "auto" becomes the
    checkpoint's), and a note when the weights were read from a pickle."""
    record = options.record(dtype=dtype_name(plan.model_dtype))
    if plan.checkpoint.source_files != plan.checkpoint.files:
        record["pickle"] = "loaded with torch.load(weights_only=True)"
    return record
