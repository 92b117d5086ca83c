"""verify's checks that run models: load, logits, greedy generation, and the float32 run.

The converted model is the real thing: OUT_DIR's files through `precompile.load`; the original shares its
tensors (`reference_model`). Both run every prompt; their logits' distance is held to the allowance
derived for this run (`allowance`: from the float32 run, or estimated from the dtype's roundoff), and a
greedy divergence passes only at a near-tie.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from precompile.check.allowance import LOGIT_KEYS, Allowance, Distance, Scale, apply_given, fixed_float32, \
    from_fp32, from_roundoff
from precompile.check.check_report import Check, precision_verdict, round_metric
from precompile.check.reference_model import BUILD_LOCK, reference_model
from precompile.io.progress import Progress
from precompile.io.safetensors_files import Checkpoint, dtype_name
from precompile.io.source import Source
from precompile.loader import PrecompileLoadError, load


def run_model_checks(out: Path, ref: Source, ref_ckpt: Checkpoint, dtype: torch.dtype, dev: torch.device, tok,
                  prompts: list[str], max_new: int, th: dict, fp32_reference: bool, half: bool, batch_size: int,
                  progress: Progress, overlay: bool = False, layers: int = 1) -> list[Check]:
    """load, logits, generation and fp32-reference: the converted model (OUT_DIR through `load`) against the
    original built around its tensors, on every prompt; a model that does not load fails all four."""
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
                    g.update(first_diff=k, original=a, converted=b, gap=round_metric(gap))
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
    gen_th["generation_tie"] = round_metric(tie)
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
    lm = {"positions": dist.positions, "max_abs_diff": round_metric(dist.max_abs),
          "mean_abs_diff": round_metric(dist.mean_abs), "rms": round_metric(dist.rms), "kl": round_metric(dist.kl),
          "kl_max": round_metric(dist.kl_max), "top1": round_metric(dist.top1)}
    th = {k: round_metric(v) for k, v in allow.as_dict().items()}
    ok = (dist.max_abs <= allow.max_abs_diff and dist.mean_abs <= allow.mean_abs_diff and dist.kl <= allow.kl
          and dist.top1 >= allow.top1)
    basis = {k: round_metric(v) if isinstance(v, float) else v for k, v in allow.basis.items()}
    return Check("logits", ok, lm, {**th, "rule": allow.rule, "basis": basis})


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
    m = {"original_rms": round_metric(ro), "converted_rms": round_metric(rc),
         "ratio": round_metric(rc / ro) if ro > 0 else None,
         "original_mean": round_metric(do.mean_abs), "converted_mean": round_metric(dc.mean_abs),
         "mean_ratio": round_metric(dc.mean_abs / do.mean_abs) if do.mean_abs > 0 else None,
         "original_max": round_metric(do.max_abs), "converted_max": round_metric(dc.max_abs),
         "original_top1": round_metric(do.top1), "converted_top1": round_metric(dc.top1),
         "ms_difference": round_metric(diff), "ms_noise": round_metric(noise) if noise is not None else None,
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


def _encode(tok, prompts: list[str], device: torch.device) -> dict:
    enc = tok(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


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
