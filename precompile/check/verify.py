"""`verify`: prove that a converted model matches its original, check by check.

The converted model is the real thing: OUT_DIR's files through `precompile.load`.
The original is built from transformers' own class with the converted model's
parameters aliased into it (after checking them byte for byte against the
reference checkpoint); only the tensors the conversion eliminated are read from
the reference. So peak memory is one model plus layer 0 and the embedding, not two.

Checks: OUT_DIR integrity, reference integrity, copied tensors, table layout, table
rows (float64 recomputation, see `rowcheck`), load, logits, greedy generation, and a
float32 run for half-precision models. Each reports metrics and its threshold.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from precompile.check.allowance import FACTOR, LOGIT_KEYS, Allowance, Distance, Scale, apply_given, fixed_float32, \
    from_fp32, from_roundoff
from precompile.check.row_check import check_rows
from precompile.compute.device import pick_device
from precompile.errors import UserError
from precompile.io.files import check_regular, file_sha256
from precompile.io.progress import Progress
from precompile.io.safetensors_files import DTYPES, TORCH_DTYPES, Checkpoint, TensorInfo, dtype_name
from precompile.io.source import Source, read_config, resolve_source
from precompile.loader import (
    MANIFEST, PLAIN_LOAD_MESSAGE, Manifest, PrecompileLoadError, SourceNotFoundError, indexed_table_file, load,
    locate_source, original_config, overlay_base)
from precompile.plan.table_layout import GUARD_SHAPE, TableLayout, layer0_tensor_names, table_layout
from precompile.profiles.catalog import conversion_profile
from precompile.profiles.profile_resolution import resolve

BUILTIN_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the Moon were",
    "A good way to learn a new language is to",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
]
DEFAULT_ROWS = 1024
DEFAULT_SEED = 0
FP32_REFERENCE_MAX_BYTES = 2 * 10**9
# Logit thresholds are derived per run (see `allowance`); the user's --max-abs-diff etc. override them.
COMMON_THRESHOLDS = {"rows_lambda": 2.0, "rows_z": 4.5, "fp32_ratio": FACTOR}
THRESHOLD_KEYS = sorted({*LOGIT_KEYS, *COMMON_THRESHOLDS, "generation_tie"})


@dataclass
class Check:
    name: str
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    threshold: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def as_dict(self) -> dict:
        d = {"name": self.name, "passed": self.passed, "metrics": self.metrics, "threshold": self.threshold}
        if self.skipped:
            d["skipped"] = self.skipped
        return d


# ----------------------------------------------------------------------------------------------- inputs


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or JSONL with a "prompt" field; blank lines are skipped."""
    p = Path(path)
    hint = 'pass a UTF-8 text file with one prompt per line, or JSONL with a "prompt" field'
    if not p.exists():
        raise UserError(f"prompts file {path} not found; {hint}")
    check_regular(p, "prompts file ")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8; re-save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"prompts file {path} cannot be read ({e.strerror}); {hint}") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"prompts file {path} is empty; {hint}")
    if p.suffix == ".jsonl" or all(line.lstrip().startswith("{") for _, line in lines):
        out = []
        for i, line in lines:
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                raise UserError(f"{path}:{i} is not valid JSON; fix the line or use a plain text file") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise UserError(f'{path}:{i} has no non-empty string "prompt" field; add one')
            out.append(obj["prompt"])
        return out
    return [line for _, line in lines]


def _prompt_list(prompts: str | Path | list[str] | None) -> list[str]:
    if prompts is None:
        return list(BUILTIN_PROMPTS)
    if isinstance(prompts, (str, Path)):
        return read_prompts(prompts)
    out = [str(p) for p in prompts if str(p).strip()]
    if not out:
        raise UserError("no prompts given; pass at least one non-empty prompt")
    return out


def _rows_arg(rows: int | str) -> int | None:
    """None means every row."""
    if isinstance(rows, str):
        if rows.strip().lower() == "all":
            return None
        try:
            rows = int(rows)
        except ValueError:
            raise UserError(f"--rows {rows} is not a number or 'all'; pass e.g. --rows 1024 or --rows all") \
                from None
    if rows < 0:
        raise UserError(f"--rows must be 0 or more (or 'all'), got {rows}")
    return rows


def _thresholds(given: dict | None) -> dict[str, float | None]:
    """None: derived once the models ran (logit limits: `allowance`; tie: twice the largest logit
    difference measured, at most the max-abs limit)."""
    th: dict[str, float | None] = {**dict.fromkeys(LOGIT_KEYS), **COMMON_THRESHOLDS, "generation_tie": None}
    for k, v in (given or {}).items():
        if v is None:
            continue
        if k not in THRESHOLD_KEYS:
            raise UserError(f"unknown threshold {k}; known: {', '.join(THRESHOLD_KEYS)}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise UserError(f"threshold {k} must be a finite number >= 0, got {v!r}")
        th[k] = float(v)
    return th


def resolve_reference(manifest: Manifest, reference: str | None) -> Source:
    """The original checkpoint: --reference, else the source recorded at conversion (`locate_source`)."""
    if reference is not None:
        try:
            return resolve_source(reference)
        except UserError as e:
            raise UserError(f"reference not found: {e}") from None
    src = manifest.source
    hub: list[Source] = []

    def snapshot(repo: str, revision: str | None) -> Path:
        hub.append(resolve_source(repo, revision))
        return hub[0].root

    try:
        root = locate_source(manifest, hub=snapshot)
    except SourceNotFoundError:
        if src.path:
            raise UserError(f"the source recorded in {MANIFEST} ({src.path}) no longer exists; pass --reference "
                            f"with the original checkpoint (directory or hub id)") from None
        raise UserError(f"{MANIFEST} records no source; pass --reference with the original checkpoint") from None
    except UserError as e:
        raise UserError(f"reference not found: {e}; or pass --reference") from None
    return hub[0] if hub else resolve_source(str(root))


# ----------------------------------------------------------------------------------------------- checks


def _hash_files(root: Path, recorded: dict[str, str]) -> tuple[list[str], list[str]]:
    changed, missing = [], []
    for name, sha in sorted(recorded.items()):
        p = root / name
        if not p.is_file():
            missing.append(name)
        elif file_sha256(p) != sha:
            changed.append(name)
    return changed, missing


def check_outputs(out: Path, manifest: Manifest | dict) -> Check:
    """Every OUT_DIR file recorded at conversion still has its sha256, and the index loads the table from the
    file the manifest names."""
    manifest = Manifest.coerce(manifest)
    recorded = manifest.outputs
    changed, missing = _hash_files(out, recorded)
    extra = sorted(p.name for p in out.iterdir() if p.is_file() and p.name not in recorded and p.name != MANIFEST)
    table_file = indexed_table_file(out, manifest)
    other_table = table_file != manifest.table.file
    metrics = {"files": len(recorded), "changed": changed, "missing": missing, "unrecorded": extra}
    if other_table:
        metrics["table_file"] = f"the index loads the table from {table_file}, the manifest names " \
                                f"{manifest.table.file}"
    return Check("integrity", bool(recorded) and not changed and not missing and not other_table, metrics,
                 {"changed": 0, "missing": 0})


def check_reference_files(ref: Source, manifest: Manifest) -> Check:
    """The reference's files are those the conversion read (sha256 recorded in the manifest)."""
    recorded = manifest.source.files
    changed, missing = _hash_files(ref.root, recorded)
    return Check("reference", bool(recorded) and not changed and not missing,
                 {"root": str(ref.root), "files": len(recorded), "changed": changed, "missing": missing},
                 {"changed": 0, "missing": 0})


def _range_sha(f, info: TensorInfo) -> str:
    h = hashlib.sha256()
    f.seek(info.start)
    left = info.nbytes
    while left:
        buf = f.read(min(left, 16 << 20))
        if not buf:
            break
        h.update(buf)
        left -= len(buf)
    return h.hexdigest()


def _tensor_sha(ckpt: Checkpoint, info: TensorInfo, dtype: str | None = None) -> str:
    if dtype is None or dtype == info.dtype:
        with open(ckpt.root / info.file, "rb") as f:
            return _range_sha(f, info)
    t = ckpt.get(info.name).to(DTYPES[dtype]).contiguous()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _plain_load_guard(out: Path, manifest: Manifest, check: Check) -> Check:
    """The copied-tensors check, failed when a guarded format's config.json lost the message that stops plain
    transformers (loader.PLAIN_LOAD_MESSAGE) before the table file's guard would."""
    if not manifest.guarded:
        return check
    try:
        ok = json.loads((out / "config.json").read_text(encoding="utf-8")).get("transformers_weights") \
            == PLAIN_LOAD_MESSAGE
    except (OSError, ValueError, AttributeError):
        ok = False
    if ok:
        return check
    metrics = {**check.metrics, "mismatched": [*check.metrics.get("mismatched", []),
                                               "config.json transformers_weights (the plain-load guard)"]}
    return Check(check.name, False, metrics, check.threshold)


def check_saved(manifest: Manifest) -> Check:
    """A directory written by save_pretrained: verify vouches for it as a conversion of the reference only when
    no tensor changed after loading (a fine-tuned model is not a conversion of its source)."""
    changed = manifest.saved.get("changed")
    metrics = {"from": manifest.saved.get("from"), "changed": changed if changed is None else len(changed)}
    if changed:
        metrics["note"] = (f"{len(changed)} tensor(s) changed after loading (e.g. {changed[0]}): this model is no "
                           f"longer a conversion of the reference, so the checks below compare against a model "
                           f"it no longer is")
    elif changed is None:
        metrics["note"] = "the checkpoint it was loaded from could not be compared when it was saved"
    return Check("saved", changed == [], metrics, {"changed": 0})


def check_copied(out_ckpt: Checkpoint, ref_ckpt: Checkpoint, layout: TableLayout, guarded: bool = True,
                 bar=None) -> Check:
    """Each tensor OUT_DIR carries over equals the reference's, byte for byte (cast to the output dtype
    when the conversion changed it); the reference tensors it lacks are exactly the eliminated ones;
    the table file's guard is there (without it plain transformers would load random layer-0 weights)."""
    mismatched, missing_in_ref, nbytes = [], [], 0
    eliminated = layout.eliminated
    guard = out_ckpt.tensors.get(layout.guard)
    if guarded and (guard is None or tuple(guard.shape) != GUARD_SHAPE):
        mismatched.append(f"{layout.guard} (the guard)")
    names = [n for n in out_ckpt.tensors if n not in (layout.tensor_name, layout.guard)]
    for name in names:
        info = out_ckpt.tensors[name]
        rinfo = ref_ckpt.tensors.get(name)
        if rinfo is None:
            missing_in_ref.append(name)
        elif tuple(rinfo.shape) != tuple(info.shape) or _tensor_sha(out_ckpt, info) != _tensor_sha(
                ref_ckpt, rinfo, info.dtype):
            mismatched.append(name)
        nbytes += info.nbytes
        if bar is not None:
            bar.update(info.nbytes)
    dropped = sorted(set(ref_ckpt.tensors) - set(out_ckpt.tensors))
    unexpected = sorted(set(dropped) - set(eliminated))
    return Check("copied-tensors", not mismatched and not missing_in_ref and not unexpected,
                 {"tensors": len(names), "bytes": nbytes, "mismatched": mismatched[:10],
                  "n_mismatched": len(mismatched), "not_in_reference": missing_in_ref[:10],
                  "dropped_not_eliminated": unexpected[:10]},
                 {"mismatched": 0})


def check_layout(manifest: Manifest, layout) -> Check:
    """The manifest's table layout is the one the profile derives from the reference."""
    table, loader = manifest.table, manifest.loader
    problems = []
    if table.columns != layout.columns:
        problems.append("columns")
    if list(table.shape) != [layout.vocab_size, layout.width]:
        problems.append("shape")
    if manifest.eliminated != layout.eliminated:
        problems.append("eliminated")
    if table.tensor != layout.tensor_name or table.guard not in (None, layout.guard):
        problems.append("tensor names")  # no guard: made before config.json held the original model type
    if loader.keep_embedding != layout.keep_embedding:
        problems.append("keep_embedding")
    x_stop = layout.columns[0].stop if layout.x_in_table else 0
    if loader.x_stop != x_stop:
        problems.append("x_stop")
    if loader.x_scale != layout.x_scale:
        problems.append("x_scale")
    fmt = lambda cols: ", ".join(f"{c.name}[{c.start}:{c.stop}]" for c in cols)  # noqa
    return Check("layout", not problems,
                 {"mismatched": problems, "manifest": fmt(table.columns), "expected": fmt(layout.columns)},
                 {"mismatched": 0})


def _row_ids(vocab: int, n: int | None, seed: int, prompt_ids: set[int]) -> tuple[list[int] | None, int]:
    if n is None:
        return None, vocab
    g = torch.Generator().manual_seed(seed)
    sample = torch.randperm(vocab, generator=g)[: min(n, vocab)].tolist()
    ids = sorted(set(sample) | {i for i in prompt_ids if 0 <= i < vocab})
    return ids, len(sample)


def check_table_rows(out: Path, manifest: Manifest, spec, layout, ref_ckpt: Checkpoint, ids: list[int] | None,
                     th: dict, device: torch.device, progress: Progress, extra: dict | None = None) -> Check:
    """Stored table rows against a float64 recomputation from the reference weights."""
    from safetensors import safe_open

    table = manifest.table
    table_dtype = TORCH_DTYPES[table.dtype]
    compute = TORCH_DTYPES[manifest.options.get("compute_dtype", "float32")]
    threshold = {"element": "|s-t| <= ulp(s)/2 + lambda*sqrt(n)*u*sum|terms|", "lambda": th["rows_lambda"],
                 "row_mean_z": th["rows_z"], "failed_rows": 0}
    metrics: dict[str, Any] = dict(extra or {})
    tpath = out / indexed_table_file(out, manifest)  # what the model loads, whatever the manifest says
    check_regular(tpath)
    with safe_open(tpath, framework="pt") as tf:
        sl = tf.get_slice(table.tensor)
        shape = list(sl.get_shape())
        if shape != [layout.vocab_size, layout.width]:
            metrics["error"] = f"table shape {shape} differs from the layout's [{layout.vocab_size}, {layout.width}]"
            return Check("table-rows", False, metrics, threshold)
        present = frozenset(ref_ckpt.tensors)
        w64 = {n: ref_ckpt.get(n).to(device=device, dtype=torch.float64) for n in layer0_tensor_names(spec, present)}
        einfo = ref_ckpt.info(spec.embedding_tensor)
        with safe_open(ref_ckpt.root / einfo.file, framework="pt") as ef:
            esl = ef.get_slice(spec.embedding_tensor)
            total = layout.vocab_size if ids is None else len(ids)
            with progress.bar(total, "checking table rows", "rows") as bar:
                stats = check_rows(spec, layout, lambda a, b: esl[a:b], lambda a, b: sl[a:b], w64, ids,
                                   table_dtype, compute, lam=th["rows_lambda"], row_z=th["rows_z"],
                                   device=device, bar=bar)
    metrics.update({"rows": stats.checked, "failed_rows": len(stats.failed_ids),
                    "failed_ids": stats.failed_ids[:10], "max_err_ulp": round(stats.max_ulp, 3),
                    "max_element_ratio": _r(stats.max_elem_ratio), "max_row_z": round(stats.max_row_z, 3),
                    "non_finite_rows": stats.non_finite, "table_dtype": table.dtype,
                    "compute_dtype": dtype_name(compute), "seconds": round(stats.seconds, 2)})
    return Check("table-rows", not stats.failed_ids, metrics, threshold)


def _guard(name: str, fn) -> Check:
    """A check that cannot read its files (a damaged OUT_DIR) fails with the reason instead of crashing."""
    from safetensors import SafetensorError

    try:
        return fn()
    except (UserError, OSError, RuntimeError, ValueError, KeyError, SafetensorError) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        return Check(name, False, {"error": f"{type(e).__name__}: {msg}"}, {})


def _r(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


# ----------------------------------------------------------------------------------------------- models


# transformers' logging is process-wide: it stays quiet while any thread is inside quiet_transformers(), and the
# last one out restores what it was (threads that saved and restored it each on their own could leave it silenced).
_QUIET = threading.Lock()
_quiet: dict[str, Any] = {"depth": 0}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own loading bars and warnings would bury the report; restore them afterwards."""
    from transformers.utils import logging as tlog

    with _QUIET:
        if _quiet["depth"] == 0:
            _quiet["saved"] = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _QUIET:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                level, bars = _quiet.pop("saved")
                tlog.set_verbosity(level)
                if bars:
                    tlog.enable_progress_bar()


# transformers sets torch's process-wide default dtype while it builds or loads a model (local_torch_dtype), and its
# lazy imports are not thread-safe: the transformers imports and model builds of concurrent threads (`batch --jobs`)
# take turns; what runs the models afterwards does not.
BUILD_LOCK = threading.RLock()
# parameters_on_meta's depth in each thread; torch's parameter-registration hook reads it (registered once: adding
# and removing a hook per build would change torch's hook table while another thread's module iterates over it).
_ON_META = threading.local()
_META_HOOK: list = []
_META_HOOK_LOCK = threading.Lock()


def _parameter_on_meta(_module: nn.Module, _name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    if getattr(_ON_META, "depth", 0) and param is not None and param.device.type != "meta":
        meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        meta._is_hf_initialized = True  # transformers' init_weights skips it (drawing on meta costs seconds)
        return meta
    return None


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no init) and real buffers.

    Only for modules this thread builds inside the block: nn.Module is not patched, and a module that another
    thread builds meanwhile gets real parameters."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    with _META_HOOK_LOCK:
        if not _META_HOOK:
            _META_HOOK.append(register_module_parameter_registration_hook(_parameter_on_meta))
    _ON_META.depth = getattr(_ON_META, "depth", 0) + 1
    try:
        yield
    finally:
        _ON_META.depth -= 1


def reference_model(converted: nn.Module, ref_root: Path, ref_ckpt: Checkpoint, dtype: torch.dtype,
                    device: torch.device) -> nn.Module:
    """The original transformers model, sharing every parameter the converted model holds under the same
    name and shape; the rest (the eliminated tensors) is read from the reference checkpoint."""
    with BUILD_LOCK:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(ref_root))
        base = AutoModelForCausalLM._model_mapping[type(config)]
        attn = getattr(converted.config, "_attn_implementation", None)
        with parameters_on_meta():
            ref = base._from_config(config, dtype=dtype, attn_implementation=attn)
    conv = dict(converted.named_parameters(remove_duplicate=False))
    loaded: dict[int, nn.Parameter] = {}
    for mod_name, module in ref.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            c = conv.get(full)
            if c is not None and tuple(c.shape) == tuple(p.shape):
                module._parameters[pname] = c
                continue
            if id(p) not in loaded:
                if full not in ref_ckpt.tensors:
                    raise RuntimeError(f"cannot build the reference: parameter {full} is neither in the converted "
                                       f"model nor in {ref_root}")
                t = ref_ckpt.get(full).to(device=device, dtype=dtype)
                loaded[id(p)] = nn.Parameter(t, requires_grad=False)
            module._parameters[pname] = loaded[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[bname] = b.to(device)
    ref.generation_config = converted.generation_config
    return ref.eval()


def _encode(tok, prompts: list[str], device: torch.device) -> dict:
    enc = tok(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def _tokenizer(out: Path, manifest: Manifest):
    with BUILD_LOCK:
        from transformers import AutoTokenizer

        # the original config, so that OUT_DIR's config.json (custom code) is never consulted
        tok = AutoTokenizer.from_pretrained(str(out), config=original_config(manifest))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i: i + n]


@torch.inference_mode()
def _logits(model: nn.Module, enc: dict) -> torch.Tensor:
    """Logits at the real (non-pad) positions, [P, V] float32 on the CPU."""
    mask = enc["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate() numbers left-padded positions
    out = model(**enc, position_ids=pos, use_cache=False).logits
    return out[enc["attention_mask"].bool()].float().cpu()


@torch.inference_mode()
def _generate(model: nn.Module, enc: dict, n: int, pad: int, eos) -> tuple[torch.Tensor, list[torch.Tensor]]:
    from transformers import GenerationConfig

    gc_ = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad,
                           eos_token_id=eos, num_beams=1, return_dict_in_generate=True, output_logits=True)
    out = model.generate(**enc, generation_config=gc_)
    new = out.sequences[:, enc["input_ids"].shape[1]:].cpu()
    return new, [x.float().cpu() for x in out.logits]


# ----------------------------------------------------------------------------------------------- verify


def read_out_dir(out_dir: str | Path) -> tuple[Path, Manifest]:
    """OUT_DIR and its manifest, or a UserError saying what OUT_DIR is not (verify, push, --update-card)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"OUT_DIR {out} is not a directory; pass the output directory of `precompile convert`")
    try:
        return out, Manifest.read(out)
    except PrecompileLoadError as e:
        raise UserError(str(e)) from None


def verify(out_dir: str | Path, *, prompts: str | Path | list[str] | None = None, reference: str | None = None,
           max_new_tokens: int = 16, rows: int | str = DEFAULT_ROWS, seed: int = DEFAULT_SEED,
           device: str = "auto", fp32_reference: bool | None = None, thresholds: dict | None = None,
           profile: str | None = None, batch_size: int = 8, progress: Progress | None = None) -> dict:
    """Run every check of OUT_DIR against its original; returns {"passed", "checks": [...], ...}.

    Bad input raises UserError before anything runs. A failed check does not raise: the result says
    which failed (the CLI maps that to exit 1).
    """
    progress = progress or Progress(quiet=True)
    t_start = time.monotonic()
    out, manifest = read_out_dir(out_dir)
    prompt_list = _prompt_list(prompts)
    n_rows = _rows_arg(rows)
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if not 0 <= seed < 2**64:
        raise UserError(f"--seed {seed} is out of range; use a whole number from 0 to 2**64 - 1")
    dev = pick_device(device)
    table_dtype_name = manifest.table.dtype
    th = _thresholds(thresholds)
    ref = resolve_reference(manifest, reference)
    ref_config = read_config(ref.root)
    prof = conversion_profile(manifest, ref_config, str(out / MANIFEST), profile)
    spec = resolve(prof, ref_config)
    ref_ckpt = Checkpoint(ref.root)
    layout = table_layout(spec, frozenset(ref_ckpt.tensors))
    dtype = TORCH_DTYPES[table_dtype_name]
    ref_bytes = sum(t.nbytes for t in ref_ckpt.tensors.values())
    half = dtype in (torch.bfloat16, torch.float16)
    if fp32_reference is None:
        fp32_reference = half and ref_bytes < FP32_REFERENCE_MAX_BYTES
    try:
        tok = _tokenizer(out, manifest)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise UserError(f"{out}: cannot load its tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        f"the conversion is incomplete, convert again") from None
    prompt_ids = {int(i) for p in prompt_list for i in tok(p)["input_ids"]}

    checks: list[Check] = []
    progress.log(f"verifying {out} against {ref.id or ref.path}{'@' + ref.revision[:12] if ref.revision else ''} "
                 f"on {dev}")
    progress.log("hashing OUT_DIR files")
    checks.append(_guard("integrity", lambda: check_outputs(out, manifest)))
    progress.log("hashing reference files")
    checks.append(check_reference_files(ref, manifest))

    overlay = manifest.kind == "overlay"

    def copied() -> Check:
        if overlay:  # the kept tensors are read from the reference's own files: check those are the base's
            try:
                overlay_base(out, base=ref.root, full=True, manifest=manifest)
            except PrecompileLoadError as e:
                return Check("copied-tensors", False, {"error": str(e).splitlines()[0]}, {"identical": True})
            return _plain_load_guard(out, manifest, Check("copied-tensors", True, {
                "overlay": "kept tensors load from the reference itself"}, {"identical": True}))
        out_ckpt = Checkpoint(out)
        copied_bytes = sum(t.nbytes for n, t in out_ckpt.tensors.items() if n != layout.tensor_name)
        with progress.bar(copied_bytes, "comparing copied tensors", "B") as bar:
            check = check_copied(out_ckpt, ref_ckpt, layout, manifest.guarded or manifest.table.guard is not None,
                                 bar)
        return _plain_load_guard(out, manifest, check)

    if manifest.saved is not None:
        checks.append(check_saved(manifest))
    checks.append(_guard("copied-tensors", copied))
    checks.append(check_layout(manifest, layout))
    ids, n_sample = _row_ids(layout.vocab_size, n_rows, seed, prompt_ids)
    extra = {"mode": "all" if ids is None else "sample", "seed": seed if ids is not None else None,
             "sampled": n_sample, "prompt_ids": len(prompt_ids)}
    checks.append(_guard("table-rows", lambda: check_table_rows(out, manifest, spec, layout, ref_ckpt, ids, th, dev,
                                                                progress, extra)))
    with quiet_transformers():
        checks += _model_checks(out, ref, ref_ckpt, dtype, dev, tok, prompt_list, max_new_tokens, th,
                                fp32_reference, half, batch_size, progress, overlay, spec.n_layers)
    passed = all(c.passed for c in checks)
    return {"passed": passed, "out_dir": str(out), "reference": ref.id or ref.path, "reference_root": str(ref.root),
            "revision": ref.revision, "profile": prof.name, "device": str(dev), "dtype": table_dtype_name,
            "prompts": len(prompt_list),
            "seconds": round(time.monotonic() - t_start, 2), "checks": [c.as_dict() for c in checks]}


def _model_checks(out: Path, ref: Source, ref_ckpt: Checkpoint, dtype: torch.dtype, dev: torch.device, tok,
                  prompts: list[str], max_new: int, th: dict, fp32_reference: bool, half: bool, batch_size: int,
                  progress: Progress, overlay: bool = False, layers: int = 1) -> list[Check]:
    given = {k: th[k] for k in LOGIT_KEYS}
    gen_th = {"identical_or_tie": True, "generation_tie": th["generation_tie"]}  # filled in once logits ran
    fp_th = {"converted <= fp32_ratio * original (mean, RMS)": th["fp32_ratio"]}
    not_run = "not run: the converted model did not load"
    progress.log("loading the converted model")
    t0 = time.monotonic()
    try:
        with BUILD_LOCK:
            conv = load(out, device=dev, **({"base": ref.root, "verify_base": True} if overlay else {}))
    except (PrecompileLoadError, OSError, RuntimeError, ValueError, KeyError, TypeError) as e:  # TypeError: a
        # damaged JSON file of OUT_DIR's (a generation_config.json that is an array) that transformers reads
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [Check("load", False, {"error": msg}, {}),
                Check("logits", False, {"error": not_run}, {}),
                Check("generation", False, {"error": not_run}, gen_th),
                Check("fp32-reference", False, {"error": not_run}, fp_th) if fp32_reference and half else
                Check("fp32-reference", True, {}, fp_th, skipped="not applicable")]
    checks = [Check("load", True, {"seconds": round(time.monotonic() - t0, 2), "device": str(dev)}, {})]
    progress.log("building the original model (sharing the converted model's tensors)")
    orig = reference_model(conv, ref.root, ref_ckpt, dtype, dev)
    pad = tok.pad_token_id
    eos = conv.generation_config.eos_token_id if conv.generation_config.eos_token_id is not None \
        else tok.eos_token_id
    keep = fp32_reference and half
    dist, scale = Distance(), Scale()
    kept: list[tuple[dict, torch.Tensor, torch.Tensor]] = []
    gens: list[dict] = []
    batches = list(_batches(prompts, batch_size))
    with progress.bar(len(batches), "running prompts", "batches") as bar:
        for bi, batch in enumerate(batches):
            enc = _encode(tok, batch, dev)
            lo, lc = _logits(orig, enc), _logits(conv, enc)
            dist.add(lo, lc)
            scale.add(lo)
            if keep:
                kept.append((enc, lo, lc))
            so, logits_o = _generate(orig, enc, max_new, pad, eos)
            sc, _ = _generate(conv, enc, max_new, pad, eos)
            for r in range(so.shape[0]):
                diff = (so[r] != sc[r]).nonzero()
                g = {"prompt": bi * batch_size + r, "first_diff": None}
                if diff.numel():
                    k = int(diff[0, 0])
                    a, b = int(so[r, k]), int(sc[r, k])
                    gap = float(logits_o[k][r, a] - logits_o[k][r, b])
                    g.update(first_diff=k, original=a, converted=b, gap=_r(gap))
                gens.append(g)
            bar.update(1)
    del orig, conv
    gc.collect()
    fp_check = None
    if keep:
        progress.log("running the float32 upcast of the original")
        fp_check, to_fp32 = _fp32_check(ref.root, kept, dev, th, fp_th)
        allow = from_fp32(to_fp32, th["fp32_ratio"])
    elif half:
        allow = from_roundoff(dtype_name(dtype), layers, scale, th["fp32_ratio"])
    else:
        allow = fixed_float32()
    allow = apply_given(allow, given)
    checks.append(_logits_check(dist, allow))
    tie = th["generation_tie"]
    if tie is None:
        tie = min(allow.max_abs_diff, 2 * dist.max_abs)
    gen_th["generation_tie"] = _r(tie)
    for g in gens:
        if g["first_diff"] is not None:
            g["tie"] = g["gap"] <= tie
    differ = [g for g in gens if g["first_diff"] is not None]
    real = [g for g in differ if not g["tie"]]
    checks.append(Check("generation", not real,
                        {"prompts": len(gens), "new_tokens": max_new, "identical": len(gens) - len(differ),
                         "diverged_at_tie": len(differ) - len(real), "differ": differ[:10]}, gen_th))
    if fp_check is None:
        why = "model dtype is float32" if not half else "off (--no-fp32-reference, or the model is 2 GB or more)"
        fp_check = Check("fp32-reference", True, {}, fp_th, skipped=why)
    checks.append(fp_check)
    return checks


def _logits_check(dist: Distance, allow: Allowance) -> Check:
    """Original vs converted on every prompt position, against limits from `allowance` (rule reported)."""
    lm = {"positions": dist.positions, "max_abs_diff": _r(dist.max_abs), "mean_abs_diff": _r(dist.mean_abs),
          "rms": _r(dist.rms), "kl": _r(dist.kl), "kl_max": _r(dist.kl_max), "top1": _r(dist.top1)}
    th = {k: _r(v) for k, v in allow.as_dict().items()}
    ok = (dist.max_abs <= allow.max_abs_diff and dist.mean_abs <= allow.mean_abs_diff and dist.kl <= allow.kl
          and dist.top1 >= allow.top1)
    return Check("logits", ok, lm, {**th, "rule": allow.rule, "basis": {k: _r(v) if isinstance(v, float) else v
                                                                          for k, v in allow.basis.items()}})


def _fp32_check(ref_root: Path, kept: list, dev: torch.device, th: dict,
                fp_th: dict) -> tuple[Check, Distance]:
    """Distances of the original's and the converted model's logits to the float32 upcast's: the converted
    model passes when its mean and RMS distances are at most fp32_ratio times the original's."""
    with BUILD_LOCK:
        from transformers import AutoModelForCausalLM

        fp32 = AutoModelForCausalLM.from_pretrained(str(ref_root), dtype=torch.float32).to(dev).eval()
    do, dc = Distance(), Distance()
    per_prompt: list[float] = []  # converted's minus original's mean squared distance to float32, per prompt
    for enc, lo, lc in kept:
        lf = _logits(fp32, enc)
        do.add(lo, lf)
        dc.add(lc, lf)
        lengths = enc["attention_mask"].sum(-1).tolist()
        for o, c, f in zip(lo.split(lengths), lc.split(lengths), lf.split(lengths)):
            per_prompt.append(float((c.double() - f).square().mean() - (o.double() - f).square().mean()))
    del fp32
    gc.collect()
    f = th["fp32_ratio"]
    ok = dc.mean_abs <= f * do.mean_abs + 1e-9 and dc.rms <= f * do.rms + 1e-9
    ro, rc = do.rms, dc.rms
    diff, noise = precision_difference(per_prompt)
    m = {"original_rms": _r(ro), "converted_rms": _r(rc), "ratio": _r(rc / ro) if ro > 0 else None,
         "original_mean": _r(do.mean_abs), "converted_mean": _r(dc.mean_abs),
         "mean_ratio": _r(dc.mean_abs / do.mean_abs) if do.mean_abs > 0 else None,
         "original_max": _r(do.max_abs), "converted_max": _r(dc.max_abs),
         "original_top1": _r(do.top1), "converted_top1": _r(dc.top1),
         "ms_difference": _r(diff), "ms_noise": _r(noise) if noise is not None else None,
         "verdict": precision_verdict(diff, noise)}
    return Check("fp32-reference", ok, m, fp_th), do


def precision_difference(per_prompt: list[float]) -> tuple[float, float | None]:
    """(mean, noise) of the per-prompt differences of mean squared distance to float32 (converted minus
    original): noise is two standard errors of the mean over prompts, None with fewer than 3 prompts."""
    n = len(per_prompt)
    mean = sum(per_prompt) / n if n else 0.0
    if n < 3:
        return mean, None
    var = sum((x - mean) ** 2 for x in per_prompt) / (n - 1)
    return mean, 2 * math.sqrt(var / n)


def precision_verdict(diff: float, noise: float | None) -> str | None:
    """"precompute gained/cost precision", only when the difference is outside the measurement's noise."""
    if noise is None or abs(diff) <= noise:
        return None
    return "precompute gained precision" if diff < 0 else "precompute cost precision"


# ----------------------------------------------------------------------------------------------- report


def fmt_metrics(c: dict) -> str:
    m = c["metrics"]
    if c.get("skipped"):
        return f"skipped: {c['skipped']}"
    if "error" in m:
        return str(m["error"])
    name = c["name"]
    if name in ("integrity", "reference"):
        bad = m["changed"] + m["missing"]
        s = f"{m['files']} files" + (f"; changed: {', '.join(m['changed'])}" if m["changed"] else "") + \
            (f"; missing: {', '.join(m['missing'])}" if m["missing"] else "")
        return s if bad or m["files"] else "no file hashes recorded"
    if name == "copied-tensors" and "overlay" in m:
        return f"overlay: {m['overlay']}"
    if name == "copied-tensors":
        s = f"{m['tensors']} tensors, {m['bytes'] / 2**20:.1f} MiB"
        if m["n_mismatched"]:
            s += f"; differ: {', '.join(m['mismatched'])}"
        if m["not_in_reference"]:
            s += f"; not in reference: {', '.join(m['not_in_reference'])}"
        if m["dropped_not_eliminated"]:
            s += f"; dropped but not eliminated: {', '.join(m['dropped_not_eliminated'])}"
        return s
    if name == "layout":
        return "matches the profile" if not m["mismatched"] else \
            f"differs in {', '.join(m['mismatched'])}: manifest {m['manifest']}; expected {m['expected']}"
    if name == "table-rows":
        what = "all rows" if m["mode"] == "all" else f"{m['rows']} rows (seed {m['seed']}, {m['sampled']} sampled " \
                                                       f"+ prompt ids)"
        s = f"{what}: element ratio {m['max_element_ratio']}, row z {m['max_row_z']}"
        if m["failed_rows"]:
            s += f"; {m['failed_rows']} bad rows, token ids {m['failed_ids']}"
        return s
    if name == "load":
        return f"precompile.load on {m['device']} in {m['seconds']}s"
    if name == "logits":
        return (f"{m['positions']} positions: max |d| {m['max_abs_diff']}, mean |d| {m['mean_abs_diff']}, "
                f"KL {m['kl']}, top-1 {m['top1']:.3f}")
    if name == "generation":
        s = f"{m['identical']}/{m['prompts']} identical over {m['new_tokens']} tokens"
        if m["diverged_at_tie"]:
            s += f", {m['diverged_at_tie']} diverged at a near-tie"
        real = [g for g in m["differ"] if not g["tie"]]
        if real:
            g = real[0]
            s += f"; prompt {g['prompt']} differs at token {g['first_diff']} ({g['original']} vs {g['converted']})"
        return s
    if name == "fp32-reference":
        return (f"to float32: mean original {m['original_mean']}, converted {m['converted_mean']}; RMS "
                f"{m['original_rms']}, {m['converted_rms']}" + (f" ({m['verdict']})" if m.get("verdict") else ""))
    return json.dumps(m)


def fmt_threshold(c: dict) -> str:
    t = c["threshold"]
    n = c["name"]
    if not t:
        return ""
    if n == "logits":
        return ((f"{t['rule']} allowance: " if t.get("rule") else "")
                + f"max<={t['max_abs_diff']:g} mean<={t['mean_abs_diff']:g} KL<={t['kl']:g} top1>={t['top1']:g}")
    if n == "table-rows":
        return f"rounding bound (x{t['lambda']:g}), row z<={t['row_mean_z']:g}"
    if n == "generation":
        tie = t.get("generation_tie")
        return "same ids" + (f" (near-tie gap<={tie:g})" if tie is not None else "")
    if n == "fp32-reference":
        return f"no farther from float32 than {next(iter(t.values())):g} x original"
    if n in ("integrity", "reference", "copied-tensors"):
        return "byte-identical"
    if n == "layout":
        return "equal"
    return ""


def format_report(result: dict) -> str:
    """A readable table, then one summary line."""
    rows = [(c["name"], "skip" if c.get("skipped") else "PASS" if c["passed"] else "FAIL", fmt_metrics(c),
             fmt_threshold(c)) for c in result["checks"]]
    w0 = max(len("check"), *(len(r[0]) for r in rows))
    lines = [f"{'check':<{w0}}  result  {'measured':<60}  threshold"]
    for name, res, met, thr in rows:
        lines.append(f"{name:<{w0}}  {res:<6}  {met:<60}  {thr}")
    lines.append(summary_line(result))
    return "\n".join(lines)


def check_counts(checks: list[dict]) -> str:
    """'8 passed, 1 skipped' (a failed or skipped count only when there is one): a skipped check is not passed."""
    skipped = sum(1 for c in checks if c.get("skipped"))
    failed = sum(1 for c in checks if not c["passed"] and not c.get("skipped"))
    parts = [f"{len(checks) - skipped - failed} passed"] + ([f"{failed} failed"] if failed else []) + (
        [f"{skipped} skipped"] if skipped else [])
    return ", ".join(parts)


def summary_line(result: dict) -> str:
    checks = result["checks"]
    failed = [c["name"] for c in checks if not c["passed"]]
    where = f"{result['out_dir']} vs {result['reference']}, {result['seconds']}s"
    if failed:
        return f"FAILED: {', '.join(failed)} ({check_counts(checks)}; {where})"
    return f"PASSED: {check_counts(checks)} ({where})"
