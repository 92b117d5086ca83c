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
where the realized saving should approach it.
"""

from __future__ import annotations

import os
import statistics
import warnings
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .device import pick_device
from .errors import UserError
from .loader import _DTYPES, _set_module, apply_layout, read_manifest
from .procfs import proc_bytes
from .progress import Progress
from .source import resolve_source


@dataclass
class BenchResult:
    theoretical: float  # share of per-token weight reads removed at batch 1, whole model
    layer0_theoretical: float  # the same for the embedding and layer 0 alone
    reads: tuple[int, int]  # weights read per token at batch 1: original, precompiled
    rows: list[tuple[str, str, float, float]] = field(default_factory=list)  # metric, unit, original, precompiled
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """A Markdown table: each metric for both variants, the gain, and realized/theoretical savings."""
        lines = ["| metric | original | precompiled | gain | saving realized / theoretical |",
                 "|---|---|---|---|---|"]
        for metric, unit, a, b in self.rows:
            theory = self.layer0_theoretical if metric.startswith("layer 0") else self.theoretical
            if unit == "tokens/s":
                gain, saving = b / a, 1 - a / b
            elif unit in ("ms", "s"):
                gain, saving = a / b, 1 - b / a
            else:  # memory: a ratio, no saving column
                lines.append(f"| {metric} | {_fmt(a, unit)} | {_fmt(b, unit)} | {b / a:.2f}x | |")
                continue
            lines.append(f"| {metric} | {_fmt(a, unit)} | {_fmt(b, unit)} | {gain:.2f}x "
                         f"| {saving:.1%} / {theory:.1%} = {saving / theory:.2f} |")
        return "\n".join(lines)

    def realized(self, metric: str) -> float:
        """Realized saving of one row as a fraction of the theoretical saving."""
        for m, unit, a, b in self.rows:
            if m == metric:
                saving = 1 - a / b if unit == "tokens/s" else 1 - b / a
                return saving / (self.layer0_theoretical if metric.startswith("layer 0") else self.theoretical)
        raise KeyError(metric)

    def speedup(self, metric: str) -> float:
        for m, unit, a, b in self.rows:
            if m == metric:
                return b / a if unit == "tokens/s" else a / b
        raise KeyError(metric)


def _fmt(v: float, unit: str) -> str:
    if unit == "bytes":
        return f"{v / 2**30:.2f} GiB"
    if unit == "tokens/s":
        return f"{v:,.1f} tok/s"
    return f"{v:.2f} {unit}"


class Toggle:
    """Switch a loaded original model between its own layer-0 modules and the table lookups."""

    def __init__(self, model: nn.Module, manifest: dict, table: torch.Tensor):
        spec = manifest["loader"]
        self.model = model
        self.paths = [spec["embedding_module"], *(c["module"] for c in manifest["table"]["columns"] if c.get("module")),
                      *spec["identity_modules"], *spec["zero_modules"]]
        self.original = {p: model.get_submodule(p) for p in self.paths}
        apply_layout(model, manifest)
        self.swapped = {p: model.get_submodule(p) for p in self.paths}
        emb = self.swapped[spec["embedding_module"]]
        emb.table = nn.Parameter(table, requires_grad=False)
        if spec["keep_embedding"]:
            emb.weight = self.original[spec["embedding_module"]].weight  # the tied head's own parameter
        self.use(False)

    def use(self, precompiled: bool) -> None:
        for p, m in (self.swapped if precompiled else self.original).items():
            _set_module(self.model, p, m)


def per_token_reads(model: nn.Module, manifest: dict, layer0_only: bool = False) -> tuple[int, int]:
    """Weights read per token at batch 1 without and with precompute (input embedding: one row).

    With layer0_only, only the embedding row and layer 0's own weights count.
    """
    spec, table = manifest["loader"], manifest["table"]
    scope = model.get_submodule(spec["attention_module"].rpartition(".")[0]) if layer0_only else model
    params = {id(p): p for p in scope.parameters()}
    total = sum(p.numel() for p in params.values())
    emb = model.get_submodule(spec["embedding_module"]).weight
    d = emb.shape[1]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    if layer0_only:
        original = total + d
    else:
        original = total - (0 if tied else emb.numel()) + d
    state = dict(model.named_parameters(remove_duplicate=False))
    gone = sum(state[n].numel() for n in manifest["eliminated"] if n in state and state[n] is not emb)
    return original, original - gone - d + table["shape"][1]


def _resident_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors the model in its current state holds."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class _Layer0Timer:
    """Time from the embedding's input to layer 0's output, once per forward call."""

    def __init__(self, toggle: Toggle, manifest: dict, sync):
        spec = manifest["loader"]
        self.sync = sync
        self.times: list[float] = []
        self._t = 0.0
        layer = toggle.model.get_submodule(spec["attention_module"].rpartition(".")[0])
        emb = spec["embedding_module"]
        self.handles = [m.register_forward_pre_hook(self._start)
                        for m in (toggle.original[emb], toggle.swapped[emb])]
        self.handles.append(layer.register_forward_hook(self._stop))

    def _start(self, *_):
        self.sync()
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.sync()
        self.times.append(time.perf_counter() - self._t)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _measure(toggle: Toggle, vocab: int, batches: tuple[int, ...], prompt_len: int, decode_tokens: int,
             device: torch.device, timer: _Layer0Timer, sync, seed: int, order: tuple[bool, bool],
             memory: dict[bool, float]) -> dict[bool, dict[str, float]]:
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
        t = time.perf_counter()
        res = model(use_cache=True, logits_to_keep=1, **kwargs)
        sync()
        dt = time.perf_counter() - t
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


def bench(out_dir: str | os.PathLike, source: str | None = None, *, device: str = "auto",
          dtype: str | None = None, batches: tuple[int, ...] = (1, 16), prompt_len: int = 128,
          decode_tokens: int = 16, reps: int = 3, progress: Progress | None = None) -> BenchResult:
    """Measure the original and the precompiled model side by side; see the module docstring."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    progress = progress or Progress(quiet=True)
    if reps < 1 or decode_tokens < 1 or prompt_len < 1 or not batches:
        raise UserError("--reps, --decode-tokens, --prompt-len and --batches must be positive")
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if source is None:
        src = manifest["source"]
        source = src.get("path") or src.get("id")
        revision = src.get("revision")
    else:
        revision = None
    if not source:
        raise UserError(f"{out_dir}/precompile.json names no source; pass --source with the original checkpoint")
    try:
        root = resolve_source(source, revision).root
    except UserError as e:
        raise UserError(f"bench needs the original checkpoint to run it side by side: {e}; pass --source") from None
    dev = pick_device(device)
    dt = _DTYPES[dtype or manifest["table"]["dtype"]]
    progress.log(f"loading the original model from {root} ({str(dt).removeprefix('torch.')} on {dev})")
    model = AutoModelForCausalLM.from_pretrained(str(root), dtype=dt).to(dev).eval()
    with safe_open(out_dir / manifest["table"]["file"], framework="pt", device=str(dev)) as f:
        table = f.get_tensor(manifest["table"]["tensor"]).to(dt)  # converted once here, never per call
    toggle = Toggle(model, manifest, table)
    reads = per_token_reads(model, manifest)
    reads0 = per_token_reads(model, manifest, layer0_only=True)
    result = BenchResult(theoretical=1 - reads[1] / reads[0], layer0_theoretical=1 - reads0[1] / reads0[0],
                         reads=reads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    timer = _Layer0Timer(toggle, manifest, sync)
    vocab = manifest["table"]["shape"][0]
    samples: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    memory: dict[bool, float] = {}
    with warnings.catch_warnings(), torch.inference_mode():  # the filter ends with the measurements
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        # warm-up with every shape the repetitions use (first calls build kernels and fault pages in)
        _measure(toggle, vocab, tuple(batches), prompt_len, 2, dev, timer, sync, 0, (False, True), {})
        for rep in range(reps):
            order = (False, True) if rep % 2 == 0 else (True, False)
            got = _measure(toggle, vocab, tuple(batches), prompt_len, decode_tokens, dev, timer, sync, rep, order,
                           memory)
            for pre in order:
                samples[pre].append(got[pre])
                progress.log(f"rep {rep + 1}/{reps} {'precompiled' if pre else 'original'}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in got[pre].items()))
    timer.remove()
    for key in samples[False][0]:
        a = statistics.median(s[key] for s in samples[False])
        b = statistics.median(s[key] for s in samples[True])
        unit = "ms" if key.startswith("layer 0") else "tokens/s"
        name = (key + f" ({prompt_len} tokens)") if key.startswith("prefill") else key
        result.rows.append((name, unit, a, b))
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
                        f"(theoretical saving {result.theoretical:.1%}); embedding row + layer 0: {reads0[0]:,} and "
                        f"{reads0[1]:,} ({result.layer0_theoretical:.1%})")
    result.notes.append(f"{torch.get_num_threads()} threads, {reps} repetitions, variants alternating call by call, "
                        f"medians; decode: {decode_tokens} steps after an 8-token prompt")
    return result
