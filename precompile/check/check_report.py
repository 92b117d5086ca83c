"""How verify reports: the `Check` record each check returns, and the report made of them.

One place words every check's outcome: the table `precompile verify` prints, its summary line, the
counts the model card shows (publish/card.py), and the float32 run's precision verdict. Every metric is
rounded here (`round_metric`) so the JSON report and the table say the same number.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Check:
    """One check's outcome: what it measured and the limits it was held to (skipped: why it did not run)."""

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


def round_metric(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (a non-finite value as it is): metrics read as measurements."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def precision_verdict(diff: float, noise: float | None) -> str | None:
    """"precompute gained/cost precision", only when the difference is outside the measurement's noise."""
    if noise is None or abs(diff) <= noise:
        return None
    return "precompute gained precision" if diff < 0 else "precompute cost precision"


def fmt_metrics(c: dict) -> str:
    """A check's measurements as one table cell."""
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
    """A check's limits as one table cell."""
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
    """PASSED/FAILED with the counts: the report's last line, and a failed verify's error."""
    checks = result["checks"]
    failed = [c["name"] for c in checks if not c["passed"]]
    where = f"{result['out_dir']} vs {result['reference']}, {result['seconds']}s"
    if failed:
        return f"FAILED: {', '.join(failed)} ({check_counts(checks)}; {where})"
    return f"PASSED: {check_counts(checks)} ({where})"
