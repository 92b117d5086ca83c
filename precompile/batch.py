"""`batch`: convert a zoo of models from one YAML file, unattended, as CI jobs need it.

Each entry is isolated (one failure does not stop the others), entries already
converted with the same source, format and options are skipped without touching
their files, `--shard I/N` splits the zoo deterministically across CI jobs, and
the results go to a JSON report and JUnit XML.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precompile.convert import convert
from precompile.errors import UserError, VerificationError
from precompile.io.files import file_sha256
from precompile.io.procfs import proc_bytes
from precompile.io.progress import Progress
from precompile.loader import MANIFEST, Manifest, PrecompileLoadError
from precompile.plan.conversion_plan import planned, recorded_options
from precompile.plan.convert_options import ConvertOptions, describe, meta, option_fields, yaml_type
from precompile.profiles.bounded_yaml import read_yaml
from precompile.profiles.yaml_schema import Fail, Wording, key, key_meta, parse


def _is_repo_id(v: str) -> bool:
    from precompile.publish.push import check_repo_id

    try:
        check_repo_id(v)
    except UserError:
        return False
    return True


# ----------------------------------------------------------------------------------------- the zoo file
# Typed sections of the YAML schema (precompile.profiles.yaml_schema), as profiles are: an entry's option keys
# are ConvertOptions' own fields (their metadata and checks), then what batch does after converting.


def _check_push_to(self: Any, fail: Fail, where: str) -> None:
    if self.push_to is not None and not _is_repo_id(self.push_to):
        raise fail(*ZOO_WORDING.wrong(f"{where}.push_to", self.push_to, str, _field(ZooOptions, "push_to")))


_BATCH_KEYS = [
    ("prompts", str | tuple[str, ...], key("verify prompts: a file, or a list of strings", None, path=True,
                                           form="a prompts file path or a list of strings")),
    ("verify", bool | None, key("verify after converting", None, form="true or false")),
    ("push_to", str | None, key("upload OUT_DIR to this hub repo", None, form="a hub repo id (namespace/name)")),
]
_OPTION_KEYS = [(f.name, yaml_type(f) | None, dataclasses.field(default=None, metadata=f.metadata))
                for f in option_fields()]
# What an entry or `defaults:` may set (left out or null: not set, ConvertOptions' default applies).
ZooOptions = dataclasses.make_dataclass("ZooOptions", [*_OPTION_KEYS, *_BATCH_KEYS], frozen=True, kw_only=True,
                                        namespace={"check": _check_push_to, "__doc__": "Options of a zoo entry."})
ZooEntry = dataclasses.make_dataclass(
    "ZooEntry", [("source", str, key("a hub id or a local path")),
                 ("out", str | None, key("a directory name under --out-root", None)), *_OPTION_KEYS, *_BATCH_KEYS],
    frozen=True, kw_only=True, namespace={"check": _check_push_to, "__doc__": "One model of a zoo."})


@dataclass(frozen=True, kw_only=True)
class Zoo:
    """A zoo file: the models to convert, and the options every entry starts from."""

    defaults: ZooOptions | None = key("options every entry starts from", None)
    models: tuple[ZooEntry | str, ...] = key("the models: a mapping each, or only the source")

    def check(self, fail: Fail, where: str) -> None:
        if not self.models:
            raise fail(*ZOO_WORDING.missing(where, "models"))


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _describe(f: dataclasses.Field) -> str:
    """What a zoo key's value must be: for an option, as the option describes it (its default says its type)."""
    return describe(next((o for o in option_fields() if o.name == f.name), f))


class ZooWording(Wording):
    """A zoo file's errors, in the words they have always had: `models[1] has unknown field 'x'`,
    `models[0].dtype must be one of ..., got 'int4'`. A key path None is an error of the whole file."""

    WHOLE = "must be a mapping with a non-empty 'models:' list (and optional 'defaults:')"
    SOURCE = "is missing field 'source' (a hub id or a local path)"

    def not_mapping(self, where: str) -> tuple[Any, str]:
        if not where:
            return None, self.WHOLE
        return (where, "must be a mapping of options") if where == "defaults" else \
            (where, "must be a mapping with a 'source' field")

    def missing(self, where: str, name: str) -> tuple[Any, str]:
        return (None, self.WHOLE) if name == "models" else (where, self.SOURCE)

    def unknown(self, where: str, name: str, known: list[str]) -> tuple[Any, str]:
        if not where:
            return "", f"unknown top-level key '{name}'; use models: and defaults:"
        keys = ", ".join(f.name for f in dataclasses.fields(ZooEntry))
        return where, f"has unknown field '{name}'; known fields: {keys}"

    def wrong(self, where: str, v: Any, tp: Any, f: dataclasses.Field) -> tuple[Any, str]:
        if where == "models":
            return None, self.WHOLE
        if re.fullmatch(r"models\[\d+\]", where):
            return where, "must be a mapping with a 'source' field"
        if f.name == "source":
            return where.rsplit(".", 1)[0], self.SOURCE
        if f.name == "out":
            return where, f"must be {key_meta(f).doc}"
        return where, f"must be {_describe(f)}, got {v!r}"

    def not_finite(self, where: str, v: Any, f: dataclasses.Field) -> tuple[Any, str]:
        return self.wrong(where, v, None, f)

    def not_a_choice(self, where: str, v: Any, f: dataclasses.Field) -> tuple[Any, str]:
        return self.wrong(where, v, None, f)

    def below_minimum(self, where: str, v: Any, f: dataclasses.Field) -> tuple[Any, str]:
        return self.wrong(where, v, None, f)


ZOO_WORDING = ZooWording()


def _zoo_fail(path: Path) -> Fail:
    def fail(where: str | None, problem: str) -> UserError:
        if where is None:
            return UserError(f"zoo file {path} {problem}")
        return UserError(f"zoo file {path}: {where + ' ' if where else ''}{problem}")
    return fail


def _accepts(name: str, value: Any) -> bool:
    """Whether the zoo schema takes `value` for the option key `name`."""
    try:
        parse(ZooOptions, {name: value}, lambda where, problem: ValueError(problem), wording=ZOO_WORDING)
    except ValueError:
        return False
    return True


# The option keys an entry (or `defaults:`) may set, each with how errors describe its values and its check:
# ZooOptions' fields, in their order.
OPTION_CHECKS: dict[str, tuple[str, Any]] = {f.name: (_describe(f), lambda v, n=f.name: _accepts(n, v))
                                             for f in dataclasses.fields(ZooOptions)}
# Fields holding a file path, which a zoo file gives relative to itself.
PATH_FIELDS = tuple(f.name for f in dataclasses.fields(ZooOptions) if key_meta(f).path)


@dataclass
class Entry:
    index: int
    source: str
    out: str
    options: dict[str, Any]

    @property
    def convert_options(self) -> ConvertOptions:
        return ConvertOptions(**{f.name: self.options[f.name] for f in option_fields() if f.name in self.options})


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


def default_out_name(source: str) -> str:
    """org/name -> org--name; a local path -> its last component."""
    name = source.rstrip("/").replace("/", "--") if not Path(source).exists() else Path(source).resolve().name
    return re.sub(r"[^\w.-]", "_", name)


def load_zoo(path: str | Path) -> list[Entry]:
    """Read and validate ZOO.yaml up front: a bad field is named with its entry index before any work."""
    path = Path(path)
    zoo = parse(Zoo, read_yaml(path, "zoo file"), _zoo_fail(path), wording=ZOO_WORDING)
    defaults = _given(zoo.defaults) if zoo.defaults is not None else {}
    entries: list[Entry] = []
    outs: dict[str, int] = {}
    for i, raw in enumerate(zoo.models):
        where = f"models[{i}]"
        raw = ZooEntry(source=raw) if isinstance(raw, str) else raw
        source = raw.source
        if not Path(source).is_absolute() and (path.parent / source).exists():
            source = str((path.parent / source).resolve())  # local paths are relative to the zoo file
        out = raw.out or default_out_name(source)
        if "/" in out or out in (".", ".."):
            raise UserError(f"zoo file {path}: {where}.out '{out}' must be a plain directory name")
        if out in outs:
            raise UserError(f"zoo file {path}: {where} writes to '{out}' like models[{outs[out]}]; set a distinct "
                            f"'out'")
        outs[out] = i
        options = {**defaults, **{k: v for k, v in _given(raw).items() if k not in ("source", "out")}}
        for key_ in PATH_FIELDS:
            if isinstance(options.get(key_), str) and not Path(options[key_]).is_absolute():
                options[key_] = str((path.parent / options[key_]).resolve())
        entries.append(Entry(i, source, out, options))
    return entries


def _given(section: Any) -> dict[str, Any]:
    """The keys a zoo section sets (a list as a list, as YAML wrote it)."""
    return {f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(section) if (v := getattr(section, f.name)) is not None}


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
    Only the options declared `compared` are (precompile/options.py): the others, such as chunk size and
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
