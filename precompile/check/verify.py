"""`verify`: prove that a converted model matches its original, check by check.

The converted model is the real thing: OUT_DIR's files through `precompile.load`.
The original is built from transformers' own class with the converted model's
parameters aliased into it (after checking them byte for byte against the
reference checkpoint); only the tensors the conversion eliminated are read from
the reference. So peak memory is one model plus layer 0 and the embedding, not two.

Checks: OUT_DIR integrity, reference integrity, copied tensors, table layout (`file_checks`), table rows
(float64 recomputation, here, see `row_check`), load, logits, greedy generation, and a float32 run for
half-precision models (`model_checks`). Each reports metrics and its threshold (`check_report`). This
module runs them in order over what `VerifyOptions` asks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from precompile.check.check_report import Check, round_metric
from precompile.check.file_checks import check_copied, check_layout, check_outputs, check_reference_files, \
    check_saved, plain_load_guard, read_out_dir
from precompile.check.model_checks import run_model_checks
from precompile.check.reference_model import load_tokenizer, quiet_transformers, resolve_reference
from precompile.check.row_check import check_rows
from precompile.check.verify_options import VerifyOptions
from precompile.compute.device import pick_device
from precompile.errors import UserError
from precompile.io.file_safety import check_regular
from precompile.io.progress import Progress
from precompile.io.safetensors_files import TORCH_DTYPES, Checkpoint, dtype_name
from precompile.io.source import read_config
from precompile.loader import MANIFEST, Manifest, PrecompileLoadError, indexed_table_file, overlay_base
from precompile.plan.table_layout import layer0_tensor_names, table_layout
from precompile.profiles.catalog import conversion_profile
from precompile.profiles.profile_resolution import resolve

FP32_REFERENCE_MAX_BYTES = 2 * 10**9


def verify(out_dir: str | Path, options: VerifyOptions | None = None, *, thresholds: dict | None = None,
           progress: Progress | None = None, **kwargs: Any) -> dict:
    """Run every check of OUT_DIR against its original; returns {"passed", "checks": [...], ...}.

    options: a VerifyOptions, or its fields as keywords (`prompts=`, `reference=`, `rows=`, `device=`, ...),
    which replace those of a given `options`; thresholds: limits by field name ({"max_abs_diff": 0.5}).
    Bad input raises UserError before anything runs. A failed check does not raise: the result says
    which failed (the CLI maps that to exit 1).
    """
    opts = VerifyOptions.build(options, thresholds, **kwargs)
    progress = progress or Progress(quiet=True)
    t_start = time.monotonic()
    out, manifest = read_out_dir(out_dir)
    prompt_list = opts.prompt_list()
    n_rows = opts.row_count()
    opts.check_ranges()
    dev = pick_device(opts.device)
    table_dtype_name = manifest.table.dtype
    th = opts.thresholds()
    ref = resolve_reference(manifest, opts.reference)
    ref_config = read_config(ref.root)
    prof = conversion_profile(manifest, ref_config, str(out / MANIFEST), opts.profile)
    spec = resolve(prof, ref_config)
    ref_ckpt = Checkpoint(ref.root)
    layout = table_layout(spec, frozenset(ref_ckpt.tensors))
    dtype = TORCH_DTYPES[table_dtype_name]
    ref_bytes = sum(t.nbytes for t in ref_ckpt.tensors.values())
    half = dtype in (torch.bfloat16, torch.float16)
    fp32_reference = opts.fp32_reference
    if fp32_reference is None:
        fp32_reference = half and ref_bytes < FP32_REFERENCE_MAX_BYTES
    try:
        tok = load_tokenizer(out, manifest)
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
            return plain_load_guard(out, manifest, Check("copied-tensors", True, {
                "overlay": "kept tensors load from the reference itself"}, {"identical": True}))
        out_ckpt = Checkpoint(out)
        copied_bytes = sum(t.nbytes for n, t in out_ckpt.tensors.items() if n != layout.tensor_name)
        with progress.bar(copied_bytes, "comparing copied tensors", "B") as bar:
            check = check_copied(out_ckpt, ref_ckpt, layout, manifest.guarded or manifest.table.guard is not None,
                                 bar)
        return plain_load_guard(out, manifest, check)

    if manifest.saved is not None:
        checks.append(check_saved(manifest))
    checks.append(_guard("copied-tensors", copied))
    checks.append(check_layout(manifest, layout))
    ids, n_sample = _row_ids(layout.vocab_size, n_rows, opts.seed, prompt_ids)
    extra = {"mode": "all" if ids is None else "sample", "seed": opts.seed if ids is not None else None,
             "sampled": n_sample, "prompt_ids": len(prompt_ids)}
    checks.append(_guard("table-rows", lambda: check_table_rows(out, manifest, spec, layout, ref_ckpt, ids, th, dev,
                                                                progress, extra)))
    with quiet_transformers():
        checks += run_model_checks(out, ref, ref_ckpt, dtype, dev, tok, prompt_list, opts.max_new_tokens, th,
                                   fp32_reference, half, opts.batch_size, progress, overlay, spec.n_layers)
    passed = all(c.passed for c in checks)
    return {"passed": passed, "out_dir": str(out), "reference": ref.id or ref.path, "reference_root": str(ref.root),
            "revision": ref.revision, "profile": prof.name, "device": str(dev), "dtype": table_dtype_name,
            "prompts": len(prompt_list),
            "seconds": round(time.monotonic() - t_start, 2), "checks": [c.as_dict() for c in checks]}


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
                    "max_element_ratio": round_metric(stats.max_elem_ratio), "max_row_z": round(stats.max_row_z, 3),
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
