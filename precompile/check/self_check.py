"""Every conversion checks itself: transformers' own layer 0 beside the converted one, before OUT_DIR appears.

A profile is a claim about what transformers computes before layer 0's attention, and transformers
is the authority. So, with OUT_DIR's files and manifest written into the temporary directory, the
source's own model class runs up to its layer 0 beside the converted model (built by the loader:
`precompiled_class`, `apply_layout`, the lookups), on a fixed set of token ids, and their layer 0
must agree within the rounding bound (a serial block's layer output on the first sequence only:
see `capture_passes`).

Both models are built from the whole config, every layer (a layer may depend on its index: GPT-NeoX-
Japanese gives only the last layer's attention a bias, and a config with one layer would make layer 0
that last one), on the meta device, so they cost no memory, and nothing after layer 0 runs. Memory
stays about one module of layer 0: each module's parameters are read (memory-mapped, cast to the run
dtype) only while that module runs.
The embedding and the table are read only at the ids fed, and the ids are renumbered into those
rows (nothing but the embedding reads token ids before layer 0).

The bound, per compared tensor, is derived, not tuned. The original model also runs in a wider
dtype that stands for the exact value (`reference_dtype`: float64 for a float32 model, float32 for
bfloat16/float16, whose rounding is 2^-24 of a value against the 2^-9 measured). The converted
model replaces a chain of model-dtype operations (embedding scale and norm, layer 0's norm and projections, a parallel
block's FFN) by one rounding of a float32 result, and runs everything after the lookup with the
original's code and dtype; so its distance to the reference is at most about the original's.
It may exceed it by chance where the maximum over elements lands on another element, by at most
a factor of the same order (measured on every shipped family: at most 1.7x): the bound is FACTOR
times the original's distance, plus FLOOR_EPS epsilons of the dtype at the tensor's largest
magnitude (2-4 ulp there), so that a tensor the original computes exactly (a float32 embedding
row) still admits a rounding-level difference. A wrong profile changes what layer 0 sees by O(1)
relative to that magnitude: 5-7 orders of magnitude past the bound in float32, 1.5-2.5 in
bfloat16, whose own rounding is 2^-9 of a value (tests/check/test_selfcheck.py; README: Safety).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from precompile.check.reference_model import BUILD_LOCK, parameters_on_meta, quiet_transformers
from precompile.errors import UserError, VerificationError
from precompile.io.safetensors_files import INDEX_NAME, Checkpoint, PartialCheckpoint, dtype_name, mapped
from precompile.io.source import fetch_files, weight_map
from precompile.loader import Manifest, config_from_dict, original_config, precompiled_class
from precompile.plan.table_layout import TABLE_FILE

if TYPE_CHECKING:
    from precompile.plan.conversion_plan import ConversionPlan

RESIDUAL, ATTENTION, OUTPUT = "residual input", "attention output", "layer output"
FACTOR = 2.0  # the converted model's distance to the reference against the original's (see the module doc)
FLOOR_EPS = 2.0  # epsilons of the model dtype at the tensor's largest magnitude: 2-4 ulp there
RANDOM_IDS = 256
SEQUENCES = 4
SEED = 0


@dataclass(frozen=True)
class PointResult:
    """One compared tensor: max |converted - original in the reference dtype| against its bound."""

    name: str
    diff: float
    bound: float
    original: float  # max |original at the model dtype - original in the reference dtype|
    scale: float  # max |original in the reference dtype|
    tokens: int  # how many tokens it was compared on

    @property
    def passed(self) -> bool:
        return self.diff <= self.bound


@dataclass(frozen=True)
class SelfCheckResult:
    """What convert's self-check compared and measured; `passed` is False only in a raised failure."""

    profile: str
    dtype: str
    tokens: int
    points: tuple[PointResult, ...]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.points)

    def outcome(self) -> str:
        """What was compared and measured, without the time (the model card must not change between runs)."""
        parts = ", ".join(f"{p.name} {p.diff:.3g} (bound {p.bound:.3g}"
                          f"{'' if p.tokens == self.tokens else f'; on {p.tokens} of them'})" for p in self.points)
        return f"layer 0 against transformers' {self.profile} class on {self.tokens} tokens, {self.dtype}: {parts}"

    def summary(self) -> str:
        return f"self-check: {self.outcome()}; {self.seconds:.1f}s"


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that stands for exact: 5 or more orders of magnitude finer than the rounding measured."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def point_bound(original: float, scale: float, dtype: torch.dtype) -> float:
    """FACTOR x the original's distance to the reference, plus FLOOR_EPS epsilons of dtype at `scale`."""
    return FACTOR * original + FLOOR_EPS * torch.finfo(dtype).eps * scale


def compared_points(block: str, n_experts: int) -> tuple[str, ...]:
    """Which of layer 0's tensors must agree.

    A parallel block's converted residual input is x + FFN(norm x) by design, so it is compared where
    the FFN has been added back: the layer output. A mixture of experts is judged at the attention
    output: its router may pick other experts on a rounding difference.
    """
    points = (ATTENTION,) if block == "parallel" else (RESIDUAL, ATTENTION)
    return points if n_experts > 1 else points + (OUTPUT,)


def capture_passes(points: tuple[str, ...], folds_ffn: bool,
                   ids: torch.Tensor) -> tuple[tuple[tuple[str, ...], torch.Tensor], ...]:
    """The forward runs that capture `points`: (points, ids) each, in order.

    Every point is compared on every token, except a serial block's layer output: the table holds
    nothing of it, so it depends on the token id only through the residual input and the attention
    output (compared on every token), by layer 0's own code after the attention (a norm and the
    FFN, token by token). What that code could get wrong beside them (a module the conversion
    replaces that the FFN also reads: a parallel block declared serial) changes every token's
    output, so one sequence shows it; it is most of layer 0's arithmetic, and this cuts the check's
    work to about a third for a Mistral-shaped layer. A parallel block's table holds x + FFN(norm x)
    per token id, so there the layer output is compared on every token.
    """
    if OUTPUT not in points or folds_ffn or points == (OUTPUT,):
        return ((points, ids),)
    return ((points[:-1], ids), ((OUTPUT,), ids[:1]))


def special_ids(config: dict, root: Path) -> set[int]:
    """bos/eos/pad ids of config.json and every special token the tokenizer files declare."""
    ids: set[int] = set()

    def add(v) -> None:
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int) and not isinstance(i, bool):
                ids.add(i)

    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        add(config.get(key))
    for name, where in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        try:
            data = json.loads((root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        entries = data.get(where) if isinstance(data, dict) else None
        if isinstance(entries, list):
            add([t.get("id") for t in entries if isinstance(t, dict) and t.get("special")])
        elif isinstance(entries, dict):
            add([int(i) for i, t in entries.items() if str(i).isdigit() and isinstance(t, dict) and t.get("special")])
    return ids


def check_tokens(config: dict, root: Path, vocab: int, seed: int = SEED) -> torch.Tensor:
    """[SEQUENCES, L] token ids: every special id, the first and last ids and RANDOM_IDS (or a few more)
    seeded random ids, shuffled into equal sequences so that positions beyond 0 occur."""
    fixed = sorted(i for i in special_ids(config, root) | {0, vocab - 1} if 0 <= i < vocab)
    g = torch.Generator().manual_seed(seed)
    n_random = RANDOM_IDS + (-(len(fixed) + RANDOM_IDS)) % SEQUENCES
    ids = torch.cat([torch.tensor(fixed, dtype=torch.long), torch.randint(vocab, (n_random,), generator=g)])
    return ids[torch.randperm(ids.numel(), generator=g)].view(SEQUENCES, -1)


class _Stop(Exception):
    """Raised by a hook once the last compared tensor is captured: nothing after it runs."""


def checkpoint_renamings(model: nn.Module) -> list:
    """transformers' renamings of checkpoint tensor names to the model's parameter names for this class (e.g.
    Flint's `self_attn.softmax_offset` -> `self_attn.sinks`), as `from_pretrained` applies them; [] without any."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        return [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
    except Exception:  # noqa: BLE001 - another transformers version: names are read as they are
        return []


class _Reader:
    """Parameters by name, from the first checkpoint that holds them, in the run dtype.

    The embedding and the table are read only at `rows` (the ids fed, renumbered 0..n-1). A parameter whose name
    is not in the checkpoint is looked up under the stored name that transformers' renamings give it."""

    def __init__(self, checkpoints: list[Checkpoint], row_tensors: set[str], rows: torch.Tensor,
                 renamings: list | None = None):
        self.checkpoints, self.row_tensors, self.rows = checkpoints, row_tensors, rows
        self.renamings = renamings or []
        self._stored: list[dict[str, str]] | None = None  # per checkpoint: parameter name -> stored name

    def _stored_name(self, i: int, name: str) -> str:
        if name in self.checkpoints[i].tensors or not self.renamings:
            return name
        if self._stored is None:
            from transformers.core_model_loading import apply_renamings

            self._stored = [{apply_renamings(k, self.renamings): k for k in c.tensors} for c in self.checkpoints]
        return self._stored[i].get(name, name)

    def __call__(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        for i, ckpt in enumerate(self.checkpoints):
            stored = self._stored_name(i, name)
            if stored in ckpt.tensors:
                t = mapped(ckpt, stored)
                t = t[self.rows] if stored in self.row_tensors else t
                return t.to(dtype)
        where = ", ".join(str(c.root) for c in self.checkpoints)
        raise VerificationError(f"self-check: layer 0 needs tensor {name}, which is not in {where}; the "
                                f"checkpoint's names differ from transformers' (pass --no-self-check to skip)")


@contextmanager
def _lazy_parameters(model: nn.Module, read: Callable[[str, torch.dtype], torch.Tensor],
                     dtype: torch.dtype, whole: str = "") -> Iterator[None]:
    """Each module's parameters are read while it runs and dropped after: memory of one module. A module with
    parameters of its own, and the module `whole` (layer 0's sequence mixer), read their submodules' too, which
    their forward may use without calling them (Mamba's mixer reads conv1d.weight, LFM2's conv.weight); a
    submodule's own hooks then find them read."""
    handles = []
    eager = _read_eagerly(model, read, dtype)
    for mod_name, module in model.named_modules():
        if mod_name != whole and not any(p is not None and p.is_meta for p in module._parameters.values()):
            continue
        read_here: list[tuple[nn.Module, str, nn.Parameter]] = []

        def pre(m, _args, mod_name=mod_name, read_here=read_here) -> None:
            for sub_name, sub in m.named_modules(prefix=mod_name):
                for n, p in list(sub._parameters.items()):
                    if p is not None and p.is_meta:
                        read_here.append((sub, n, p))
                        sub._parameters[n] = nn.Parameter(read(f"{sub_name}.{n}" if sub_name else n, dtype),
                                                          requires_grad=False)

        def post(m, _args, _out, read_here=read_here) -> None:
            for sub, n, p in read_here:
                sub._parameters[n] = p
            read_here.clear()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for sub, n, p in eager:
            sub._parameters[n] = p


def _read_eagerly(model: nn.Module, read: Callable[[str, torch.dtype], torch.Tensor],
                  dtype: torch.dtype) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """The embedding (or table) rows, read before the run: model code may read the embedding's weight (its
    device or dtype: Llama 4) before calling it, and on the meta device that would feed the run no real data.
    Returns what to put back."""
    rows = getattr(read, "row_tensors", set())
    eager = []
    for mod_name, module in model.named_modules():
        for n, p in list(module._parameters.items()):
            if p is not None and p.is_meta and f"{mod_name}.{n}" in rows:
                eager.append((module, n, p))
                module._parameters[n] = nn.Parameter(read(f"{mod_name}.{n}", dtype), requires_grad=False)
    return eager


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _capture(model: nn.Module, ids: torch.Tensor, layer: str, attention: str, points: tuple[str, ...],
             read: Callable[[str, torch.dtype], torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Run the model up to the last compared tensor (nothing after it); the tensors, in float64 (exactly)."""
    got: dict[str, torch.Tensor] = {}
    last = points[-1]

    def keep(name: str, t: torch.Tensor) -> None:
        if t.is_meta:  # some input never read its weights: there are no figures to compare
            raise VerificationError(f"self-check: layer 0's {name} was computed without data (on the meta device); "
                                    f"the model's forward reads a weight the check does not load (pass "
                                    f"--no-self-check to skip)")
        got[name] = t.detach().double()
        if name == last:
            raise _Stop

    def residual(_m, args, kwargs) -> None:
        if RESIDUAL in points:
            keep(RESIDUAL, args[0] if args else kwargs["hidden_states"])

    handles = [model.get_submodule(layer).register_forward_pre_hook(residual, with_kwargs=True),
               model.get_submodule(attention).register_forward_hook(lambda _m, _a, out: keep(ATTENTION, _first(out))),
               model.get_submodule(layer).register_forward_hook(lambda _m, _a, out: keep(OUTPUT, _first(out)))]
    try:
        with _lazy_parameters(model, read, dtype, attention), torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


def _build(cls: type, config, dtype: torch.dtype) -> nn.Module:
    with parameters_on_meta():
        return cls._from_config(config, dtype=dtype, attn_implementation="eager").eval()


def _source_checkpoint(plan: ConversionPlan, names: list[str], renamings: list) -> Checkpoint:
    """The source's tensors layer 0 reads: the plan's checkpoint, or for an overlay the files holding them (under
    their stored names, which transformers' renamings may change)."""
    if plan.kind != "overlay":
        return plan.checkpoint
    wmap = weight_map(plan.source)
    if renamings and any(n not in wmap for n in names):
        from transformers.core_model_loading import apply_renamings

        stored = {apply_renamings(k, renamings): k for k in wmap}
        names = [n if n in wmap else stored.get(n, n) for n in names]
    names = [n for n in names if n in wmap]
    fetch_files(plan.source, sorted({wmap[n] for n in names}))
    return PartialCheckpoint(plan.source.root, wmap, names)


def _converted_checkpoints(tmp: Path, table: str, source: Checkpoint) -> list[Checkpoint]:
    """Where the converted model's tensors come from: OUT_DIR's files, then (an overlay) its base."""
    if (tmp / INDEX_NAME).exists():
        return [Checkpoint(tmp)]
    return [PartialCheckpoint(tmp, {table: TABLE_FILE}, [table]), source]


@dataclass
class Reference:
    """transformers' own layer 0 on the check's tokens, at the reference dtype and the model dtype: what the
    conversion is compared with. It reads only the source, so convert computes it while OUT_DIR's files are
    still being written (`reference_layer0`, then `compare`)."""

    plan: ConversionPlan
    base: type  # the source's transformers class
    layer: str
    attention: str
    ids: torch.Tensor  # [SEQUENCES, L], renumbered into `used`
    used: torch.Tensor  # the token ids fed, sorted: the embedding and table rows read
    row_tensors: set[str]  # the embedding and the table: read only at `used`
    renamings: list
    source: Checkpoint
    passes: tuple[tuple[tuple[str, ...], torch.Tensor], ...]  # capture_passes
    exact: tuple[dict[str, torch.Tensor], ...]  # per pass, in the reference dtype
    original: tuple[dict[str, torch.Tensor], ...]  # per pass, in the model dtype
    seconds: float


@contextmanager
def _one_line(plan: ConversionPlan) -> Iterator[None]:
    """Whatever transformers raises becomes one line naming the profile and the way out."""
    try:
        yield
    except (VerificationError, UserError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, one line and the way out
        first = str(e).splitlines()[0] if str(e) else ""
        raise VerificationError(f"self-check: transformers' class for profile {plan.spec.profile} could not run "
                                f"layer 0 beside the conversion ({type(e).__name__}: {first}); pass "
                                f"--no-self-check to convert without the check") from e


def self_check(plan: ConversionPlan, tmp: Path) -> SelfCheckResult:
    """Compare layer 0 of the source's transformers class with layer 0 of the conversion in `tmp`.

    Raises VerificationError naming the profile, the tensor and the difference against its bound, or
    saying why the two could not be run (a conversion that cannot be checked is not published).
    """
    return compare(reference_layer0(plan), tmp)


def reference_layer0(plan: ConversionPlan) -> Reference:
    """The source's own layer 0 on the check's tokens (the source only: nothing of the conversion is read)."""
    with _one_line(plan):
        return _reference(plan)


def compare(ref: Reference, tmp: Path) -> SelfCheckResult:
    """The conversion in `tmp` (its files and manifest written) against `ref`; raises as `self_check`."""
    with _one_line(ref.plan):
        return _compare(ref, tmp)


def _reference(plan: ConversionPlan) -> Reference:
    t0 = time.monotonic()
    spec, dtype = plan.spec, plan.model_dtype
    attention = spec.attention_module
    # the decoder layer: the attention's parent, or the list entry 0 above it (LongCat's self_attn.0 in layers.0)
    layer = attention[:attention.index(".0.") + 2] if ".0." in attention else attention.rpartition(".")[0]
    tokens = check_tokens(plan.config, plan.source.root, spec.vocab_size)
    used, ids = torch.unique(tokens, return_inverse=True)
    ref_dtype = reference_dtype(dtype)
    with BUILD_LOCK, quiet_transformers():  # imports and builds take turns across threads; the runs below do not
        from transformers import AutoModelForCausalLM

        # every layer, on meta: a one-layer config would build layer 0 as the last layer, which may differ
        config = config_from_dict(plan.config)
        base = AutoModelForCausalLM._model_mapping[type(config)]
        original = {d: _build(base, config, d) for d in (ref_dtype, dtype)}
    emb_names = {spec.embedding_tensor, plan.layout.tensor_name}
    needed = [n for n, _ in original[dtype].named_parameters()
              if n in emb_names or n.startswith(layer + ".") or
              (spec.embedding_norm is not None and n.startswith(f"{spec.embedding_norm.module}."))]
    renamings = checkpoint_renamings(original[dtype])
    source = _source_checkpoint(plan, needed, renamings)
    read = _Reader([source], emb_names, used, renamings)
    passes = capture_passes(compared_points(spec.block, spec.layer0_experts), spec.folds_ffn, ids)
    exact = tuple(_capture(original[ref_dtype], i, layer, attention, pts, read, ref_dtype) for pts, i in passes)
    orig = tuple(_capture(original[dtype], i, layer, attention, pts, read, dtype) for pts, i in passes)
    return Reference(plan, base, layer, attention, ids, used, emb_names, renamings, source, passes, exact, orig,
                     time.monotonic() - t0)


def _compare(ref: Reference, tmp: Path) -> SelfCheckResult:
    t0 = time.monotonic()
    plan = ref.plan
    spec, dtype = plan.spec, plan.model_dtype
    manifest = Manifest.read(tmp)
    with BUILD_LOCK, quiet_transformers():
        converted = _build(precompiled_class(ref.base, manifest), original_config(manifest), dtype)
    read = _Reader(_converted_checkpoints(tmp, plan.layout.tensor_name, ref.source), ref.row_tensors, ref.used,
                   ref.renamings)
    results = []
    for (points, ids), exact, orig in zip(ref.passes, ref.exact, ref.original):
        conv = _capture(converted, ids, ref.layer, ref.attention, points, read, dtype)
        for name in points:
            scale = float(exact[name].abs().max())
            orig_d = float((orig[name] - exact[name]).abs().max())
            diff = (float((conv[name] - exact[name]).abs().max()) if conv[name].shape == exact[name].shape
                    else float("inf"))
            results.append(PointResult(name, diff, point_bound(orig_d, scale, dtype), orig_d, scale, int(ids.numel())))
    result = SelfCheckResult(spec.profile, dtype_name(dtype), int(ref.ids.numel()), tuple(results),
                             ref.seconds + time.monotonic() - t0)
    bad = next((p for p in result.points if not p.passed), None)
    if bad is not None:
        raise VerificationError(
            f"self-check: layer 0 of the conversion disagrees with transformers' own model at its {bad.name}: "
            f"max |difference| {bad.diff:.3g} > bound {bad.bound:.3g} (the original in {result.dtype} is "
            f"{bad.original:.3g} from {dtype_name(reference_dtype(dtype))}, values up to {bad.scale:.3g}); "
            f"profile {spec.profile} does not "
            f"describe this model's forward, fix the profile (nothing was written; --no-self-check skips this)")
    return result
