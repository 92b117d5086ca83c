"""`batch`: convert a zoo of models from one YAML file, unattended, as CI jobs need it.

Each entry is isolated (one failure does not stop the others), entries already
converted with the same source, format and options are skipped without touching
their files, `--shard I/N` splits the zoo deterministically across CI jobs, and
the results go to a JSON report and JUnit XML.
"""

from __future__ import annotations

import re
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from precompile.convert import convert
from precompile.errors import UserError, VerificationError
from precompile.io.hashed_copy import file_sha256
from precompile.io.process_memory import proc_bytes
from precompile.io.progress import Progress
from precompile.loader import MANIFEST, Manifest, PrecompileLoadError
from precompile.plan.conversion_plan import planned, recorded_options
from precompile.plan.convert_options import meta, option_fields
from precompile.zoo_file import Entry, load_zoo


@dataclass
class EntryResult:
    entry: Entry
    status: str = "failed"  # ok | skipped | failed
    seconds: float = 0.0
    bytes: int = 0
    plan: dict | None = None
    verify: dict | None = None
    error: str | None = None
    pushed: str | None = None  # the hub repo OUT_DIR was uploaded to
    reason: str | None = None  # why an existing OUT_DIR was converted again (see stale_reason)

    def as_dict(self) -> dict:
        return {"source": self.entry.source, "out": self.entry.out, "status": self.status,
                "seconds": round(self.seconds, 3), "bytes": self.bytes, "plan": self.plan, "verify": self.verify,
                "error": self.error, "pushed": self.pushed, "reason": self.reason}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise UserError(f"--shard {text} must be I/N with 1 <= I <= N, e.g. 1/4")
    return int(m.group(1)), int(m.group(2))


def select_shard(entries: list[Entry], shard: tuple[int, int] | None) -> list[Entry]:
    """Entry k goes to shard (k mod N) + 1: N jobs together cover every entry exactly once."""
    if shard is None:
        return entries
    i, n = shard
    return [e for e in entries if e.index % n == i - 1]


def up_to_date(entry: Entry, out_dir: Path) -> bool:
    """True when OUT_DIR's manifest records this entry's source files, format version and options, and every
    output file is intact (see `stale_reason`)."""
    return stale_reason(entry, out_dir) is None


def stale_reason(entry: Entry, out_dir: Path) -> str | None:
    """Why OUT_DIR must be converted again, or None when it is up to date.

    Planning resolves the source (from the HF cache for hub ids) and reads headers only. Output files are
    checked lazily: every size first (a truncated table fails without reading anything), then every sha256.
    Only the options declared `compared` are (precompile/plan/convert_options.py): the others, such as chunk size and
    device, change table values at most within the rounding bound (the bytes are the same for the same
    options on one machine; README: Determinism).
    """
    if not (out_dir / MANIFEST).exists():
        return "no manifest"
    try:
        manifest = Manifest.read(out_dir)
    except PrecompileLoadError as e:
        return f"manifest unusable ({e})"
    opts = entry.convert_options
    with planned(entry.source, opts) as plan:
        want = recorded_options(plan, opts)
    src = manifest.source
    if plan.source.describe() != {k: getattr(src, k) for k in plan.source.describe()}:
        return "another source"
    recorded = manifest.options
    ignored = {f.name for f in option_fields() if not meta(f).compared}
    if any(recorded.get(k) != want.get(k) for k in (recorded.keys() | want.keys()) - ignored):
        return "other options"
    if manifest.kind != plan.kind or manifest.profile.name != plan.profile.name:
        return "another kind or profile"
    if manifest.profile.text not in (None, plan.profile.text):
        return "the profile file was edited"
    files = src.files
    root = plan.source.root
    if any(not (root / name).exists() or file_sha256(root / name) != sha for name, sha in files.items()):
        return "source files changed"
    outputs = manifest.outputs
    sizes = manifest.output_sizes or {}
    if not outputs:
        return "manifest records no outputs"
    for name in sorted(outputs):
        p = out_dir / name
        if not p.is_file():
            return f"output {name} missing"
        if name in sizes and p.stat().st_size != sizes[name]:
            return f"output {name} has {p.stat().st_size} bytes, the manifest records {sizes[name]} (size)"
    for name, sha in sorted(outputs.items()):
        if file_sha256(out_dir / name) != sha:
            return f"output {name} differs from its recorded sha256 (hash)"
    return None


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); 8 GiB where it cannot be read."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return 8 << 30 if available is None else available


def estimate_memory(entry: Entry) -> int:
    """Peak bytes a conversion holds: layer-0 weights in the compute dtype plus a few chunks of rows."""
    opts = entry.convert_options
    with planned(entry.source, opts) as plan:
        elem = 8 if opts.compute_dtype == "float64" else 4
        weights = sum(plan.checkpoint.info(n).numel for n in plan.read_tensors[1:]) * elem
        chunk = min(opts.chunk_size, plan.layout.vocab_size)
        rows = chunk * (plan.spec.hidden_size + plan.layout.width) * elem * 4
    return weights + rows + (256 << 20)  # interpreter and library overhead per conversion


class MemoryBudget:
    """Admit conversions while their estimated peaks fit; one always runs, however large."""

    def __init__(self, total: int):
        self.total, self.used, self._cv = total, 0, threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self.used == 0 or self.used + n <= self.total)
            self.used += n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _run_entry(entry: Entry, out_root: Path, verify_all: bool, progress: Progress) -> EntryResult:
    result = EntryResult(entry)
    t0 = time.monotonic()
    out_dir = out_root / entry.out
    push_to = entry.options.get("push_to")
    try:
        if push_to:  # a missing token or a local overlay fails before the conversion, not after it
            from precompile.publish.push import check_push_source

            check_push_source(push_to, entry.source, entry.convert_options.overlay)
        reason = stale_reason(entry, out_dir)
        if reason is None:
            result.status = "skipped"
        else:
            if out_dir.exists():
                result.reason = reason
                progress.log(f"[{entry.index + 1}] {out_dir}: converting again: {reason}")
            convert(entry.source, out_dir, entry.convert_options, force=True, progress=progress)
            result.status = "ok"
        result.bytes = _tree_bytes(out_dir)
        result.plan = _plan(out_dir)
        if entry.options.get("verify", verify_all):
            result.verify = _verify(entry, out_dir, progress)
            if not result.verify.get("passed"):
                failed = [c["name"] for c in result.verify.get("checks", []) if not c.get("passed")]
                raise VerificationError(f"verify failed: {', '.join(failed) or 'see report'}")
        if push_to:  # after verify: a failed verify never uploads
            from precompile.publish.push import push

            push(out_dir, push_to, progress=progress)
            result.pushed = push_to
    except (UserError, VerificationError, PrecompileLoadError) as e:
        result.status, result.error = "failed", str(e)
    except Exception as e:  # an entry's internal failure must not stop the zoo
        result.status, result.error = "failed", f"{type(e).__name__}: {e}"
    result.seconds = time.monotonic() - t0
    return result


def _plan(out_dir: Path) -> dict | None:
    from precompile.plan.plan_report import plan_model

    return plan_model(str(out_dir))


def _verify(entry: Entry, out_dir: Path, progress: Progress) -> dict:
    from precompile.check.verify import verify

    prompts = entry.options.get("prompts")
    return verify(out_dir, prompts=prompts, progress=progress)


def run_batch(zoo: str | Path, out_root: str | Path, *, shard: str | None = None, jobs: int = 1,
              verify: bool = False, fail_fast: bool = False, memory_budget: int | None = None,
              progress: Progress | None = None) -> list[EntryResult]:
    """Convert every entry of this shard; returns one result per entry, in zoo order.

    With jobs > 1, entries run in threads (torch and file copies release the GIL) admitted by a memory
    budget (default: half of the available memory).
    """
    progress = progress or Progress(quiet=True)
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    budget = MemoryBudget(memory_budget or available_memory() // 2)
    entries = select_shard(load_zoo(zoo), parse_shard(shard))
    out_root = Path(out_root)
    results: dict[int, EntryResult] = {}
    stop = threading.Event()
    inner = progress if jobs == 1 else Progress(quiet=True)

    with progress.bar(len(entries), "models", "models") as bar:
        def work(entry: Entry) -> EntryResult:
            if stop.is_set():
                r = EntryResult(entry, error="not run: an earlier entry failed and --fail-fast is set")
            else:
                try:
                    need = estimate_memory(entry) if jobs > 1 else 0
                except Exception:  # the entry's own run reports the problem
                    need = 0
                budget.acquire(need)
                progress.log(f"[{entry.index + 1}] {entry.source} -> {out_root / entry.out}")
                try:
                    r = _run_entry(entry, out_root, verify, inner)
                finally:
                    budget.release(need)
                progress.log(f"[{entry.index + 1}] {entry.source}: {r.status}"
                             + (f" ({r.error})" if r.error else f" in {r.seconds:.1f}s"))
                if r.status == "failed" and fail_fast:
                    stop.set()
            bar.update(1)
            return r

        if jobs == 1:
            for e in entries:
                results[e.index] = work(e)
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                for e, r in zip(entries, pool.map(work, entries)):
                    results[e.index] = r
    return [results[e.index] for e in entries]


def dry_run(zoo: str | Path, out_root: str | Path, shard: str | None = None) -> list[tuple[Entry, str]]:
    """What a run would do per entry: convert, skip (up to date) or fail (with the reason); writes nothing."""
    out: list[tuple[Entry, str]] = []
    for e in select_shard(load_zoo(zoo), parse_shard(shard)):
        try:
            if up_to_date(e, Path(out_root) / e.out):
                action = "skip (up to date)"
            else:
                with planned(e.source, e.convert_options):  # reads headers only: finds what would fail
                    action = "convert"
        except (UserError, PrecompileLoadError) as err:
            action = f"fail: {err}"
        if e.options.get("push_to") and not action.startswith("fail"):
            action += f", then push to {e.options['push_to']}"
        out.append((e, action))
    return out


def summary(results: list[EntryResult]) -> dict[str, int]:
    return {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "failed")}


def report(results: list[EntryResult]) -> dict:
    return {"summary": summary(results), "entries": [r.as_dict() for r in results]}


def junit_xml(results: list[EntryResult]) -> str:
    """JUnit XML: one testcase per entry; failed entries are failures, skipped ones are skipped."""
    s = summary(results)
    suite = ET.Element("testsuite", name="precompile batch", tests=str(len(results)), failures=str(s["failed"]),
                       skipped=str(s["skipped"]), errors="0",
                       time=f"{sum(r.seconds for r in results):.3f}")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname="precompile.batch", name=f"{r.entry.source} -> "
                             f"{r.entry.out}", time=f"{r.seconds:.3f}")
        if r.status == "failed":
            ET.SubElement(case, "failure", message=r.error or "failed").text = r.error
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", message="up to date")
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def summary_table(results: list[EntryResult]) -> str:
    rows = [("status", "source", "out", "seconds", "MiB", "error")]
    for r in results:
        rows.append((r.status, r.entry.source, r.entry.out, f"{r.seconds:.1f}", f"{r.bytes / 2**20:.1f}",
                     (r.error or "")[:100]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    s = summary(results)
    lines.append(f"{s['ok']} ok, {s['skipped']} skipped, {s['failed']} failed")
    return "\n".join(lines)
