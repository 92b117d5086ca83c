"""Conversion options, defined once.

Each field of `ConvertOptions` carries its default and metadata (help, allowed values, whether the
manifest records it, whether `batch` compares it), and everything else is derived from them: the
flags of `precompile convert` (cli.py), the fields a zoo entry may set and how they are checked
(zoo_file.py's zoo sections reuse these very fields), the manifest's `options` record and the keywords of
the library's `convert()`. As mergekit derives its flags from `MergeOptions`: an option added here
appears everywhere at once. The metadata is the YAML schema's (`OptionMeta` extends
`precompile.profiles.yaml_schema.KeyMeta`), so options, zoo keys and profile keys are declared one way.

It imports nothing heavier than the error type and the YAML schema.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from precompile.errors import UserError
from precompile.profiles.yaml_schema import KeyMeta, declared, key_meta

if TYPE_CHECKING:
    from precompile.profiles.profile_resolution import Profile


@dataclass(frozen=True)
class OptionMeta(KeyMeta):
    """What a `ConvertOptions` field declares besides its default: the YAML schema's `KeyMeta` (`doc` is the CLI
    flag's help and the zoo key's meaning in docs/batch.md; `form` how a zoo error describes an allowed value,
    where the type and choices do not say it), and what the CLI and the manifest make of it. Its zoo key is
    the field's name."""

    flag: str = ""  # the CLI flag when it is not --<name>: "--no-x" sets a boolean that defaults to true to false
    recorded: bool = False  # the manifest's `options` holds it (with the value planning resolved)
    compared: bool = False  # it changes what is written beyond rounding: planning takes it, and `batch`
    #                         converts again when it differs (the others change bytes at most within the
    #                         rounding bound, or not at all; README: Determinism)

    @property
    def help(self) -> str:
        return self.doc


def _option(default: Any, help: str, **meta: Any) -> Any:
    """A ConvertOptions field: its default and its OptionMeta."""
    return declared(OptionMeta(help, **meta), default)


@dataclass(frozen=True)
class ConvertOptions:
    """How `convert` works: `convert(source, out_dir, ConvertOptions(...))`, or the fields as keywords."""

    revision: str | None = _option(None, "Hub revision (branch, tag or commit) for a hub SOURCE.", form="a string",
                                   compared=True)
    profile: str | os.PathLike | Profile | None = _option(  # noqa: RUF009 - _option is field(), frozen
        None, "Architecture profile YAML (default: chosen from config.json).", form="a path to a YAML profile",
        path=True, compared=True)
    device: str = _option("auto", "Where to compute the table (auto: CUDA when available).",
                          choices=("auto", "cpu", "cuda"))
    dtype: str = _option("auto", "Output dtype (auto: the checkpoint's own).",
                         choices=("auto", "float32", "bfloat16", "float16"), recorded=True, compared=True)
    compute_dtype: str = _option("float32", "Precision of the table computation.", choices=("float32", "float64"),
                                 recorded=True, compared=True)
    chunk_size: int = _option(4096, "Vocabulary rows per compute chunk.", minimum=1, form="a positive integer")
    link: str = _option("auto", "How unchanged shards enter OUT_DIR (hardlink: editing OUT_DIR edits the source).",
                        choices=("auto", "reflink", "hardlink", "copy"))
    overlay: bool = _option(False, "Write only the table (+ manifest, config, tokenizer, shim), loaded over the "
                            "unchanged SOURCE; fetch only the files layer 0 needs.", compared=True)
    allow_pickle: bool = _option(False, "Read PyTorch *.bin/*.pt weights when there are no safetensors (loaded with "
                                 "torch.load(weights_only=True): tensors only, no code runs).", compared=True)
    self_check: bool = _option(True, "Skip comparing layer 0 with transformers' own model before OUT_DIR is written "
                               "(a wrong profile then goes unnoticed).", flag="--no-self-check")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))

    @classmethod
    def build(cls, options: ConvertOptions | None = None, **kwargs: Any) -> ConvertOptions:
        """`options` (default: all defaults) with `kwargs` replacing fields; an unknown keyword is a TypeError."""
        return dataclasses.replace(options, **kwargs) if options is not None else cls(**kwargs)

    @classmethod
    def from_record(cls, record: dict, **kwargs: Any) -> ConvertOptions:
        """The options a manifest's `options` record holds, plus `kwargs` (materialize converts an overlay's base
        with the overlay's options)."""
        return cls(**{f.name: record[f.name] for f in option_fields() if meta(f).recorded}, **kwargs)

    def record(self, **resolved: Any) -> dict[str, Any]:
        """The manifest's `options`: the recorded fields, with `resolved` values (dtype "auto" becomes the
        checkpoint's dtype) in place of the given ones."""
        return {f.name: resolved.get(f.name, getattr(self, f.name)) for f in option_fields() if meta(f).recorded}

    def compared(self) -> dict[str, Any]:
        """The options planning takes (the keywords of `plan_conversion`): those that change what is written."""
        return {f.name: getattr(self, f.name) for f in option_fields() if meta(f).compared}


def option_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(ConvertOptions)


def meta(f: dataclasses.Field | str) -> OptionMeta:
    if isinstance(f, str):
        f = next(x for x in option_fields() if x.name == f)
    return key_meta(f)


def cli_flag(f: dataclasses.Field) -> str:
    """`--chunk-size` for chunk_size, or the declared flag."""
    return meta(f).flag or "--" + f.name.replace("_", "-")


def describe(f: dataclasses.Field) -> str:
    """What a value of this option (or zoo key) must be, as errors say it: "one of auto, cpu, cuda", "true or
    false"."""
    m = key_meta(f)
    if m.choices:
        return f"one of {', '.join(m.choices)}"
    return m.form or ("true or false" if isinstance(f.default, bool) else "a string")


def yaml_type(f: dataclasses.Field) -> type:
    """The type of this option's value as a YAML file (a zoo) writes it: a path is a string there."""
    return bool if isinstance(f.default, bool) else int if isinstance(f.default, int) else str


def check_value(name: str, value: Any) -> None:
    """Refuse a value outside the option's choices or below its minimum, naming the CLI flag (the library
    says the same as the CLI)."""
    f = next(x for x in option_fields() if x.name == name)
    m = meta(f)
    if m.choices and value not in m.choices:
        raise UserError(f"{cli_flag(f)} {value} is not one of {', '.join(m.choices)}")
    if m.minimum is not None and value < m.minimum:
        raise UserError(f"{cli_flag(f)} must be at least {m.minimum}, got {value}")


def zoo_table() -> str:
    """The Markdown table of the options a zoo entry may set (docs/batch.md holds it; a test keeps it current)."""
    rows = ["| field | value | default | skip rule compares | `convert` flag: help |",
            "| --- | --- | --- | --- | --- |"]
    for f in option_fields():
        m = meta(f)
        default = "none" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        help = m.help.replace("*", r"\*")  # Markdown: *.bin/*.pt is not emphasis
        rows.append(f"| `{f.name}` | {describe(f)} | {default} | {'yes' if m.compared else 'no'} | "
                    f"`{cli_flag(f)}`: {help} |")
    return "\n".join(rows)
