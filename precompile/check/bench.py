"""`precompile bench OUT_DIR`: the run-time gain, measured against its theoretical value.

One model in one process: the original is loaded from the source checkpoint, the table from
OUT_DIR, and layer 0's modules are toggled between the original ones and the lookups
(`loader.apply_layout`), so both variants share every other weight, the same memory and the
same threads. The variants alternate call by call (each prefill and decode step runs once per
variant back to back, which goes first alternating between repetitions) and figures are medians,
so drift in a shared machine's speed hits both alike.

The theoretical saving is the share of per-token weight reads that precompute removes at
batch 1 (the paper's accounting over the whole model): eliminated weights read per token /
all weights read per token. Decode at batch 1 reads every weight once per token, so that is
where the realized saving should approach it; at batch B the weights are read once for B
tokens and the table's extra columns B times, so the saving shrinks and turns negative past the
break-even batch.

A saving of a fraction of a percent is easily lost in a shared machine's noise, so repetitions
go on until the 95% confidence interval of the batch-1 decode saving (Student's t over the
repetitions' paired savings) is narrower than its theoretical value: at least --reps, at most
--max-reps, and past --budget seconds they stop as soon as there are two. Each timed row reports
its interval; a row whose interval is wider than its theoretical saving is reported as
unresolved, never as a ratio.
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from precompile.compute.device import pick_device
from precompile.errors import UserError
from precompile.io.process_memory import proc_bytes
from precompile.io.progress import Progress
from precompile.io.safetensors_files import TORCH_DTYPES, dtype_name
from precompile.io.source import resolve_source
from precompile.loader import (
    Manifest, PrecompileLoadError, SourceNotFoundError, _set_module, apply_layout, locate_source)


# two-sided 95% Student's t quantiles by degrees of freedom (a df between two keys takes the smaller key's, larger)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


@dataclass(frozen=True)
class Interval:
    """The mean of n paired savings with its 95% confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def width(self) -> float:
        return self.high - self.low


def saving_interval(savings: list[float]) -> Interval:
    """95% interval of the mean saving over repetitions (Student's t); infinitely wide below 2 samples."""
    n = len(savings)
    mean = statistics.fmean(savings) if n else 0.0
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n)
    t = _T95[max(k for k in _T95 if k <= n - 1)]
    half = t * statistics.stdev(savings) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def resolved(iv: Interval, theory: float) -> bool:
    """The run can tell the effect from noise: its interval is narrower than the theoretical saving."""
    return iv.width < abs(theory)


def describe_saving(iv: Interval, theory: float) -> tuple[str, float | None]:
    """(the realized/theoretical cell, the ratio or None): a ratio only when the interval resolves the effect."""
    if not resolved(iv, theory):
        return (f"unresolved: the interval is {iv.width:.1%} wide, the expected {theory:+.2%} is below what this "
                f"run can resolve"), None
    ratio = iv.mean / theory
    return f"{iv.mean:+.2%} / {theory:+.2%} = {ratio:.2f}", ratio


@dataclass
class BenchResult:
    theoretical: float  # share of per-token weight reads removed at batch 1, whole model
    layer0_theoretical: float  # the same for the embedding and layer 0 alone
    reads: tuple[int, int]  # weights read per token at batch 1: original, precompiled
    rows: list[tuple[str, str, float, float]] = field(default_factory=list)  # metric, unit, original, precompiled
    notes: list[str] = field(default_factory=list)
    intervals: dict[str, Interval] = field(default_factory=dict)  # metric -> the saving's interval
    theory: dict[str, float] = field(default_factory=dict)  # metric -> its theoretical saving
    verdict: dict | None = None  # plan's headline for this conversion (plan.trade.trade)
    reps: int = 0

    def table(self) -> str:
        """A Markdown table: each metric for both variants, the gain, the saving with its 95% interval, and the
        realized share of the theoretical saving where the run resolves it."""
        lines = ["| metric | original | precompiled | gain | saving (95% interval) | theoretical | "
                 "realized / theoretical |", "|---|---|---|---|---|---|---|"]
        for metric, unit, a, b in self.rows:
            if unit not in ("tokens/s", "ms", "s"):  # memory: a ratio, no saving column
                lines.append(f"| {metric} | {_fmt(a, unit)} | {_fmt(b, unit)} | {b / a:.2f}x | | | |")
                continue
            gain = b / a if unit == "tokens/s" else a / b
            iv, theory = self.intervals[metric], self.theory[metric]
            lines.append(f"| {metric} | {_fmt(a, unit)} | {_fmt(b, unit)} | {gain:.2f}x "
                         f"| {iv.mean:+.2%} [{iv.low:+.2%}, {iv.high:+.2%}] | {theory:+.2%} "
                         f"| {describe_saving(iv, theory)[0]} |")
        return "\n".join(lines)

    def realized(self, metric: str) -> float | None:
        """Realized saving of one row as a fraction of the theoretical saving; None when unresolved."""
        if metric not in self.intervals:
            raise KeyError(metric)
        return describe_saving(self.intervals[metric], self.theory[metric])[1]

    def speedup(self, metric: str) -> float:
        for m, unit, a, b in self.rows:
            if m == metric:
                return b / a if unit == "tokens/s" else a / b
        raise KeyError(metric)

    def summary(self) -> list[str]:
        """plan's verdict line, then what this run measured at batch 1, in plain words."""
        from precompile.plan.trade import verdict_line

        lines = [verdict_line(self.verdict)] if self.verdict else []
        iv, theory = self.intervals["decode b1"], self.theory["decode b1"]
        if resolved(iv, theory):
            lines.append(f"measured: decode at batch 1 saved {iv.mean:+.2%} (95% interval {iv.low:+.2%} to "
                         f"{iv.high:+.2%}, {iv.n} repetitions) of the {theory:+.2%} expected")
        else:
            lines.append(f"measured: decode at batch 1 is unresolved: the saving's 95% interval ({iv.low:+.2%} to "
                         f"{iv.high:+.2%}, {iv.n} repetitions) is wider than the {theory:+.2%} expected, so the "
                         f"effect is below what this run can resolve (more --reps or a longer --budget narrow it)")
        return lines


def _fmt(v: float, unit: str) -> str:
    if unit == "bytes":
        return f"{v / 2**30:.2f} GiB"
    if unit == "tokens/s":
        return f"{v:,.1f} tok/s"
    return f"{v:.2f} {unit}"


class Toggle:
    """Switch a loaded original model between its own layer-0 modules and the table lookups."""

    def __init__(self, model: nn.Module, manifest: Manifest | dict, table: torch.Tensor):
        manifest = Manifest.coerce(manifest)
        spec = manifest.loader
        self.model = model
        self.paths = [spec.embedding_module, *(c.module for c in manifest.table.columns if c.module),
                      *spec.identity_modules, *spec.zero_modules]
        self.original = {p: model.get_submodule(p) for p in self.paths}
        apply_layout(model, manifest)
        self.swapped = {p: model.get_submodule(p) for p in self.paths}
        emb = self.swapped[spec.embedding_module]
        emb.table = nn.Parameter(table, requires_grad=False)
        if spec.keep_embedding:
            emb.weight = self.original[spec.embedding_module].weight  # the tied head's own parameter
        self.use(False)

    def use(self, precompiled: bool) -> None:
        for p, m in (self.swapped if precompiled else self.original).items():
            _set_module(self.model, p, m)


def per_token_reads(model: nn.Module, manifest: Manifest | dict, layer0_only: bool = False) -> tuple[int, int]:
    """Weights read per token at batch 1 without and with precompute (input embedding: one row).

    With layer0_only, only the embedding row and layer 0's own weights count.
    """
    manifest = Manifest.coerce(manifest)
    spec, table = manifest.loader, manifest.table
    scope = model.get_submodule(spec.attention_module.rpartition(".")[0]) if layer0_only else model
    params = {id(p): p for p in scope.parameters()}
    total = sum(p.numel() for p in params.values())
    emb = model.get_submodule(spec.embedding_module).weight
    d = emb.shape[1]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    if layer0_only:
        original = total + d
    else:
        original = total - (0 if tied else emb.numel()) + d
    state = dict(model.named_parameters(remove_duplicate=False))
    gone = sum(state[n].numel() for n in manifest.eliminated if n in state and state[n] is not emb)
    # a table row replaces the embedding row, unless x is still read (or recomputed) from a kept tied embedding
    return original, original - gone - (d if spec.x_stop else 0) + table.shape[1]


def theoretical_saving(reads: tuple[int, int], per_token: tuple[int, int], tokens: int) -> float:
    """The share of weight reads saved when one forward call handles `tokens` tokens: the weights are read once,
    the embedding row (without) and the table row (with) once per token. reads: (without, with) at one token;
    per_token: the (without, with) reads each further token adds."""
    without = reads[0] + (tokens - 1) * per_token[0]
    return 1 - (reads[1] + (tokens - 1) * per_token[1]) / without


def _resident_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors the model in its current state holds."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class _Layer0Timer:
    """Time from the embedding's input to layer 0's output, once per forward call."""

    def __init__(self, toggle: Toggle, manifest: Manifest, sync, clock: Callable[[], float] = time.perf_counter):
        spec = manifest.loader
        self.sync = sync
        self.clock = clock
        self.times: list[float] = []
        self._t = 0.0
        layer = toggle.model.get_submodule(spec.attention_module.rpartition(".")[0])
        emb = spec.embedding_module
        self.handles = [m.register_forward_pre_hook(self._start)
                        for m in (toggle.original[emb], toggle.swapped[emb])]
        self.handles.append(layer.register_forward_hook(self._stop))

    def _start(self, *_):
        self.sync()
        self._t = self.clock()

    def _stop(self, *_):
        self.sync()
        self.times.append(self.clock() - self._t)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _measure(toggle: Toggle, vocab: int, batches: tuple[int, ...], prompt_len: int, decode_tokens: int,
             device: torch.device, timer: _Layer0Timer, sync, seed: int, order: tuple[bool, bool],
             memory: dict[bool, float], clock: Callable[[], float] = time.perf_counter) -> dict[bool, dict[str, float]]:
    """One repetition of every measurement, the two variants alternating call by call.

    Each prefill and each decode step runs once per variant back to back (decode keeps one KV
    cache per variant), so a change in the machine's speed hits both variants alike.
    """
    model = toggle.model
    g = torch.Generator().manual_seed(seed)
    out: dict[bool, dict[str, float]] = {False: {}, True: {}}

    def timed(pre: bool, **kwargs):
        toggle.use(pre)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t = clock()
        res = model(use_cache=True, logits_to_keep=1, **kwargs)
        sync()
        dt = clock() - t
        if device.type == "cuda":
            memory[pre] = max(memory.get(pre, 0), torch.cuda.max_memory_allocated(device))
        return res, dt

    for b in batches:
        ids = torch.randint(0, vocab, (b, prompt_len), generator=g).to(device)
        for pre in order:
            out[pre][f"prefill b{b}"] = b * prompt_len / timed(pre, input_ids=ids)[1]
    for b in batches:
        ids = torch.randint(0, vocab, (b, 8), generator=g).to(device)
        state, steps, layer0 = {}, {False: [], True: []}, {False: [], True: []}
        for pre in order:
            res, _ = timed(pre, input_ids=ids)
            state[pre] = (res.past_key_values, res.logits[:, -1:].argmax(-1))
        for _ in range(decode_tokens):
            for pre in order:
                past, nxt = state[pre]
                res, dt = timed(pre, input_ids=nxt, past_key_values=past)
                steps[pre].append(dt)
                layer0[pre].append(timer.times[-1])
                state[pre] = (res.past_key_values, res.logits[:, -1:].argmax(-1))
        for pre in order:
            out[pre][f"decode b{b}"] = b / statistics.median(steps[pre])
            out[pre][f"layer 0 decode b{b}"] = statistics.median(layer0[pre]) * 1e3
    return out


def _plan_verdict(root: Path, manifest: Manifest, progress: Progress) -> dict | None:
    """plan's headline for this conversion (the source planned at the table's dtype with the recorded profile),
    so that bench's verdict line is plan's; None, with a note, when the source cannot be planned."""
    from precompile.plan.trade import exact_figures
    from precompile.plan.conversion_plan import plan_conversion
    from precompile.profiles.catalog import conversion_profile

    try:
        prof = conversion_profile(manifest, manifest.source.config, str(root))
        return exact_figures(plan_conversion(str(root), profile=prof, dtype=manifest.table.dtype))["verdict"]
    except UserError as e:
        progress.log(f"no verdict: {e}")
        return None


def bench(out_dir: str | os.PathLike, source: str | None = None, *, device: str = "auto",
          dtype: str | None = None, batches: tuple[int, ...] = (1, 16), prompt_len: int = 128,
          decode_tokens: int = 16, reps: int = 3, max_reps: int = 100, budget: float = 120.0,
          progress: Progress | None = None, clock: Callable[[], float] = time.perf_counter) -> BenchResult:
    """Measure the original and the precompiled model side by side; see the module docstring.

    Batch 1 is always measured, beside `batches`. `clock` times the calls (tests stub it); the budget is
    wall time.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    progress = progress or Progress(quiet=True)
    if reps < 1 or decode_tokens < 1 or prompt_len < 1 or not batches or max_reps < 1 or budget <= 0:
        raise UserError("--reps, --max-reps, --budget, --decode-tokens, --prompt-len and --batches must be positive")
    batches = tuple(sorted({1, *batches}))
    max_reps = max(reps, max_reps)
    out_dir = Path(out_dir)
    manifest = Manifest.read(out_dir)
    why = "bench needs the original checkpoint to run it side by side"
    try:
        root = resolve_source(source).root if source is not None else \
            locate_source(manifest, hub=lambda repo, revision: resolve_source(repo, revision).root)
    except SourceNotFoundError:
        if manifest.source.path:
            raise UserError(f"{why}: {manifest.source.path}, recorded in {out_dir}/precompile.json, is gone; pass "
                            f"--source") from None
        raise UserError(f"{out_dir}/precompile.json names no source; pass --source with the original checkpoint") \
            from None
    except (UserError, PrecompileLoadError) as e:
        raise UserError(f"{why}: {e}; pass --source") from None
    dev = pick_device(device)
    dt = TORCH_DTYPES[dtype or manifest.table.dtype]
    verdict = _plan_verdict(root, manifest, progress)
    progress.log(f"loading the original model from {root} ({dtype_name(dt)} on {dev})")
    model = AutoModelForCausalLM.from_pretrained(str(root), dtype=dt).to(dev).eval()
    with safe_open(out_dir / manifest.table.file, framework="pt", device=str(dev)) as f:
        table = f.get_tensor(manifest.table.tensor).to(dt)  # converted once here, never per call
    toggle = Toggle(model, manifest, table)
    reads = per_token_reads(model, manifest)
    reads0 = per_token_reads(model, manifest, layer0_only=True)
    d = manifest.loader.hidden_size
    row = (d, table.shape[1] + (0 if manifest.loader.x_stop else d))  # reads each further token adds
    result = BenchResult(theoretical=1 - reads[1] / reads[0], layer0_theoretical=1 - reads0[1] / reads0[0],
                         reads=reads, verdict=verdict)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    timer = _Layer0Timer(toggle, manifest, sync, clock)
    vocab = manifest.table.shape[0]
    samples: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    memory: dict[bool, float] = {}

    def theory(key: str) -> float:
        tokens = int(key.rsplit("b", 1)[1]) * (prompt_len if key.startswith("prefill") else 1)
        return theoretical_saving(reads0 if key.startswith("layer 0") else reads, row, tokens)

    def intervals() -> dict[str, Interval]:
        out = {}
        for key in samples[False][0]:
            unit_tps = not key.startswith("layer 0")  # tokens/s (higher is better), else ms
            out[key] = saving_interval([1 - a[key] / b[key] if unit_tps else 1 - b[key] / a[key]
                                        for a, b in zip(samples[False], samples[True])])
        return out

    t_start = time.monotonic()
    with warnings.catch_warnings(), torch.inference_mode():  # the filter ends with the measurements
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        # warm-up with every shape the repetitions use (first calls build kernels and fault pages in)
        _measure(toggle, vocab, batches, prompt_len, 2, dev, timer, sync, 0, (False, True), {}, clock)
        rep = 0
        while True:
            order = (False, True) if rep % 2 == 0 else (True, False)
            got = _measure(toggle, vocab, batches, prompt_len, decode_tokens, dev, timer, sync, rep, order,
                           memory, clock)
            for pre in order:
                samples[pre].append(got[pre])
            rep += 1
            iv = intervals()["decode b1"]
            progress.log(f"rep {rep}: decode b1 saving {iv.mean:+.2%}, 95% interval {iv.width:.2%} wide "
                         f"(theoretical {theory('decode b1'):+.2%})")
            # the budget ends the run once an interval exists (2 repetitions), even before --reps
            if (rep >= reps and resolved(iv, theory("decode b1"))) or rep >= max_reps or (
                    rep >= 2 and time.monotonic() - t_start >= budget):
                break
    timer.remove()
    result.reps = rep
    result.intervals = intervals()
    for key in samples[False][0]:
        a = statistics.median(s[key] for s in samples[False])
        b = statistics.median(s[key] for s in samples[True])
        unit = "ms" if key.startswith("layer 0") else "tokens/s"
        name = (key + f" ({prompt_len} tokens)") if key.startswith("prefill") else key
        result.rows.append((name, unit, a, b))
        result.intervals[name] = result.intervals.pop(key)
        result.theory[name] = theory(key)
    held = {}
    for pre in (False, True):  # the swapped-out modules are unreachable, so each state counts its own weights
        toggle.use(pre)
        held[pre] = _resident_bytes(model)
    toggle.use(False)
    result.rows.append(("weights in memory", "bytes", held[False], held[True]))
    if memory:
        result.rows.append(("peak CUDA memory", "bytes", memory[False], memory[True]))
    hwm = proc_bytes("/proc/self/status", "VmHWM")
    if hwm:
        result.notes.append(f"process peak RSS (both variants resident at once): {hwm / 2**30:.2f} GiB")
    result.notes.append(f"weights read per token at batch 1: {reads[0]:,} original, {reads[1]:,} precompiled "
                        f"(theoretical saving {result.theoretical:.2%}); embedding row + layer 0: {reads0[0]:,} and "
                        f"{reads0[1]:,} ({result.layer0_theoretical:.1%})")
    result.notes.append(f"{torch.get_num_threads()} threads, {rep} repetitions (least {reps}, most {max_reps}, "
                        f"budget {budget:g}s), variants alternating call by call; figures are medians, intervals "
                        f"95% over the repetitions' paired savings; decode: {decode_tokens} steps after an 8-token "
                        f"prompt")
    return result
