"""Verify options, defined once: what `verify` is asked to check, and with which limits.

Each field of `VerifyOptions` carries its default and a `VerifyFlag` (help, flag, metavar, value type), from
which `precompile verify`'s flags are derived (cli.py), as `ConvertOptions` does for convert. The limits a
user may set are fields too (`threshold=True`): `thresholds()` turns them into the limits the checks read,
with the fixed defaults filled in and the derived ones left None. Reading the prompts file and the --rows
value also live here: they turn an option's value into what the checks use.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precompile.errors import UserError
from precompile.io.file_safety import check_regular
from precompile.plan.convert_options import meta
from precompile.profiles.yaml_schema import KeyMeta, declared, key_meta

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
# The limits that do not depend on the run (and fp32_ratio's, allowance.FACTOR); the others (logits: `allowance`;
# generation_tie: twice the largest logit difference measured, at most the max-abs limit) are derived once the
# models ran.
FIXED_THRESHOLDS = {"rows_lambda": 2.0, "rows_z": 4.5}


@dataclass(frozen=True)
class VerifyFlag(KeyMeta):
    """What a `VerifyOptions` field declares besides its default: the YAML schema's `KeyMeta`, as `OptionMeta`
    extends it for `ConvertOptions` (`doc` is the flag's help), so that cli.py builds both commands' flags one
    way, from one kind of field metadata."""

    flag: str = ""  # the CLI flag when it is not --<name> ("--a/--no-a": on, off or unset)
    metavar: str | None = None
    kind: type = str  # the CLI value's type
    show_default: bool = False
    threshold: bool = False  # a check's limit: a key of `thresholds()` and of verify's `thresholds` keyword
    cli: bool = True  # `precompile verify` has a flag for it

    @property
    def help(self) -> str:
        return self.doc


def _flag(default: Any, help: str, **flag: Any) -> Any:
    """A VerifyOptions field: its default and its VerifyFlag."""
    return declared(VerifyFlag(help, **flag), default)


def _limit(help: str, flag: str = "") -> Any:
    """A threshold field: None is its default (fixed or derived)."""
    return _flag(None, help, flag=flag, kind=float, threshold=True)


@dataclass(frozen=True)
class VerifyOptions:
    """How `verify` works: `verify(out_dir, VerifyOptions(...))`, or the fields as keywords."""

    prompts: str | Path | list[str] | None = _flag(  # noqa: RUF009 - _flag is field(), frozen
        None, "Prompts: a UTF-8 text file (one per line) or JSONL with a \"prompt\" field (default: a small "
        "built-in set).", metavar="FILE")
    reference: str | None = _flag(None, "The original checkpoint (directory or hub id; default: the source "
                                  "recorded in precompile.json).", metavar="SOURCE")
    max_new_tokens: int = _flag(16, "Greedy tokens generated per prompt.", minimum=1)
    rows: int | str = _flag(DEFAULT_ROWS, "Table rows to recompute: N sampled (seeded) plus every prompt token, or "
                            "'all'.", metavar="N|all", show_default=True)
    seed: int = _flag(DEFAULT_SEED, "Seed of the row sample.", kind=int, show_default=True)
    device: str = _flag("auto", "Where to run the models.", choices=meta("device").choices)
    fp32_reference: bool | None = _flag(None, "Also run the original upcast to float32 (default: on for "
                                        "bfloat16/float16 models under 2 GB).",
                                        flag="--fp32-reference/--no-fp32-reference")
    profile: str | None = _flag(None, "Architecture profile YAML (default: the one recorded in precompile.json).",
                                path=True)
    max_abs_diff: float | None = _limit("Largest allowed |logit difference| (default: derived, see README).")
    mean_abs_diff: float | None = _limit("Largest allowed mean |logit difference|.", "--max-mean-diff")
    kl: float | None = _limit("Largest allowed mean KL(original || converted).", "--max-kl")
    top1: float | None = _limit("Smallest allowed top-1 agreement (0-1).", "--min-top1")
    generation_tie: float | None = _limit("Logit gap under which a greedy divergence counts as a tie.")
    rows_lambda: float | None = _limit("Safety factor of the table rows' accumulation bound (default 2).")
    rows_z: float | None = _limit("Largest allowed row-mean error statistic (default 4.5).")
    fp32_ratio: float | None = _limit("Largest allowed converted/original mean and RMS distance to float32; also "
                                      "the F of the derived logit limits (default 1.5).", "--max-fp32-ratio")
    batch_size: int = _flag(8, "Prompts run at once.", minimum=1, cli=False)

    @classmethod
    def build(cls, options: VerifyOptions | None = None, thresholds: dict | None = None,
              **kwargs: Any) -> VerifyOptions:
        """`options` (default: all defaults) with `kwargs` and the `thresholds` dict (its keys are the threshold
        fields' names; None leaves a limit as it is) replacing fields; an unknown keyword is a TypeError."""
        given = {k: v for k, v in (thresholds or {}).items() if v is not None}
        unknown = [k for k in given if k not in threshold_keys()]
        if unknown:
            raise UserError(f"unknown threshold {unknown[0]}; known: {', '.join(threshold_keys())}")
        kwargs = {**kwargs, **given}
        return dataclasses.replace(options, **kwargs) if options is not None else cls(**kwargs)

    def thresholds(self) -> dict[str, float | None]:
        """The limits the checks read: the given ones (each a finite number >= 0), else the fixed default, else
        None (derived once the models ran)."""
        from precompile.check.allowance import FACTOR  # imports torch: not at the CLI's start-up

        fixed = {**FIXED_THRESHOLDS, "fp32_ratio": FACTOR}
        th: dict[str, float | None] = {}
        for f in verify_fields():
            if not flag_of(f).threshold:
                continue
            v = getattr(self, f.name)
            if v is None:
                th[f.name] = fixed.get(f.name)
                continue
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise UserError(f"threshold {f.name} must be a finite number >= 0, got {v!r}")
            th[f.name] = float(v)
        return th

    def prompt_list(self) -> list[str]:
        """The prompts: the built-in set, the file's, or the given list (blank ones dropped)."""
        if self.prompts is None:
            return list(BUILTIN_PROMPTS)
        if isinstance(self.prompts, (str, Path)):
            return read_prompts(self.prompts)
        out = [str(p) for p in self.prompts if str(p).strip()]
        if not out:
            raise UserError("no prompts given; pass at least one non-empty prompt")
        return out

    def row_count(self) -> int | None:
        """The table rows to sample; None means every row."""
        rows = self.rows
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

    def check_ranges(self) -> None:
        """Refuse a count out of range, naming the flag (the library says the same as the CLI)."""
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**64:
            raise UserError(f"--seed {self.seed} is out of range; use a whole number from 0 to 2**64 - 1")


def verify_fields() -> tuple[dataclasses.Field, ...]:
    """VerifyOptions' fields, in the order `precompile verify --help` lists their flags."""
    return dataclasses.fields(VerifyOptions)


def flag_of(f: dataclasses.Field) -> VerifyFlag:
    """A VerifyOptions field's declaration."""
    return key_meta(f)


def threshold_keys() -> list[str]:
    """The names of the limits a user may set, sorted (as errors list them)."""
    return sorted(f.name for f in verify_fields() if flag_of(f).threshold)


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
