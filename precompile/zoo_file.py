"""The zoo file `precompile batch` reads: its typed sections and the entries it becomes.

A zoo file is YAML a user writes, so it is validated as profiles are, by the YAML schema
(`precompile.profiles.yaml_schema`): the option keys of an entry (or of `defaults:`) are `ConvertOptions`'
own fields, with their metadata and checks, then what batch does after converting (`prompts`, `verify`,
`push_to`). A `ZooWording` gives its errors the words they have always had (`models[1] has unknown field
'x'`), every one a single line naming the file, before any model is converted.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precompile.errors import UserError
from precompile.plan.convert_options import ConvertOptions, describe, option_fields, yaml_type
from precompile.profiles.bounded_yaml import read_yaml
from precompile.profiles.yaml_schema import Fail, Wording, key, key_meta, parse


def _is_repo_id(v: str) -> bool:
    from precompile.publish.push import check_repo_id

    try:
        check_repo_id(v)
    except UserError:
        return False
    return True


# Typed sections of the YAML schema (precompile.profiles.yaml_schema), as profiles are: an entry's option keys
# are ConvertOptions' own fields (their metadata and checks), then what batch does after converting.


def _check_push_to(self: Any, fail: Fail, where: str) -> None:
    if self.push_to is not None and not _is_repo_id(self.push_to):
        raise fail(*ZOO_WORDING.wrong(f"{where}.push_to", self.push_to, str, _field(ZooOptions, "push_to")))


_BATCH_KEYS = [
    ("prompts", str | tuple[str, ...] | None, key("verify prompts: a file, or a list of strings", None,
                                                  form="a prompts file path or a list of strings", path=True)),
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
