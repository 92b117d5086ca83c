"""verify's checks of files: OUT_DIR against its manifest, and what it carries over against the reference.

Hashes (every recorded file of OUT_DIR and of the reference), copied tensors byte for byte, the plain-load
guard, the table layout the profile derives, and a save_pretrained directory's record. None of them runs a
model. `check_outputs` and `read_out_dir` also serve push and the model card (publish/), which vouch for
OUT_DIR's files the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from precompile.check.check_report import Check
from precompile.errors import UserError
from precompile.io.hashed_copy import file_sha256
from precompile.io.safetensors_files import DTYPES, Checkpoint, TensorInfo
from precompile.io.source import Source
from precompile.loader import MANIFEST, PLAIN_LOAD_MESSAGE, Manifest, PrecompileLoadError, indexed_table_file
from precompile.plan.table_layout import GUARD_SHAPE, TableLayout


def read_out_dir(out_dir: str | Path) -> tuple[Path, Manifest]:
    """OUT_DIR and its manifest, or a UserError saying what OUT_DIR is not (verify, push, --update-card)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise UserError(f"OUT_DIR {out} is not a directory; pass the output directory of `precompile convert`")
    try:
        return out, Manifest.read(out)
    except PrecompileLoadError as e:
        raise UserError(str(e)) from None


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


def plain_load_guard(out: Path, manifest: Manifest, check: Check) -> Check:
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
