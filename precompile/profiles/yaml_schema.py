"""Typed YAML sections, written once: validation, parsing and the documentation's key table come from them.

A section is a frozen dataclass whose fields are declared with `key()`: the field's type annotation says
which YAML values it takes, its default whether it is required, and its metadata (`KeyMeta`) the help text,
the allowed values, the smallest allowed integer and whether the value names a tensor or a file. The same
metadata declares `ConvertOptions` (`OptionMeta` extends it), so profile keys, zoo keys and options are
described one way. `parse` turns a YAML mapping into the dataclass, refusing an unknown key, a missing
required key or a value of the wrong type with `fail(key path, problem)`, worded by a `Wording` (a zoo file
words its errors its own way); a section with a `check(fail, where)` method adds the rules that relate its
fields. `dump` writes a section back as YAML data, and `key_table` renders the Markdown tables a reader
looks keys up in.

Types a field may have: `str`, `bool`, `int` (a whole number), `float` (any number), `tuple[str, ...]` (a
list of names), `dict[str, Any]` (a free mapping), `Any`, another section, `tuple[Section, ...]` (a list of
sections), a value class (a class with `from_yaml`, `to_yaml` and a `FORM`, for values written in several
ways), and unions of these, told apart by the YAML value's kind (a string, a bool, a number, a list or a mapping);
`X | None` makes null the same as leaving the key out.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from functools import cache
from typing import Any

Fail = Callable[[str, str], Exception]  # (key path, problem) -> the exception to raise


@dataclass(frozen=True)
class KeyMeta:
    """What a field declares besides its type and default (see `key`)."""

    doc: str  # the help text: the key table's meaning, the CLI flag's help
    choices: tuple[str, ...] = ()  # the allowed strings, when they are a fixed set
    tensor: bool = False  # a string value is a tensor name on disk
    form: str = ""  # how the value is written where the type does not say it well (errors, the key table)
    minimum: int | None = None  # the smallest allowed integer
    path: bool = False  # a file path (in a zoo file, relative to the zoo file)


def key(doc: str, default: Any = MISSING, *, choices: tuple[str, ...] = (), tensor: bool = False,
        form: str = "", minimum: int | None = None, path: bool = False) -> Any:
    """A section field: `doc` is its help text, `default` (none: required) its value when left out, and the
    rest its `KeyMeta`."""
    return declared(KeyMeta(doc, tuple(choices), tensor, form, minimum, path), default)


def declared(meta: KeyMeta, default: Any = MISSING) -> Any:
    """A field with this metadata (a `KeyMeta` or a subclass of it) and default (none: required)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"key": meta})
    return field(default=default, metadata={"key": meta})


def key_meta(f: Field) -> KeyMeta:
    return f.metadata["key"]


def is_required(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


@cache
def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(where: str, k: Any) -> str:
    return f"{where}.{k}" if where else str(k)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and is_dataclass(tp) and not hasattr(tp, "from_yaml")


def _is_value_class(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "from_yaml")


def _alternatives(tp: Any) -> list[Any]:
    """The non-null alternatives of a union type, or [tp]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def is_number(v: Any) -> bool:
    """An int or float (not a bool) that is finite as a float: YAML's .inf and .nan, JSON's Infinity, NaN and
    1e400, and integers past a float's range are not numbers to a profile (every size, eps or factor must be
    one)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def is_infinite(v: Any) -> bool:
    """A number that `is_number` refuses for its value: infinite, NaN or too large for a float."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not is_number(v)


def _takes(tp: Any, v: Any) -> bool:
    """Whether a union alternative is the one for a YAML value of this kind."""
    origin = typing.get_origin(tp)
    if tp is str:
        return isinstance(v, str)
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return is_number(v)
    if origin is tuple:
        return isinstance(v, list)
    return isinstance(v, dict) if (origin is dict or _is_section(tp)) else True


class Wording:
    """How `parse` words each kind of mistake, as the (key path, problem) it passes to `fail`. This one is the
    profiles'; a kind of file whose errors have their own words (a zoo file) subclasses it."""

    def not_mapping(self, where: str) -> tuple[Any, str]:
        return where, "must be a mapping"

    def missing(self, where: str, name: str) -> tuple[Any, str]:
        return _join(where, name), "is missing"

    def unknown(self, where: str, name: str, known: list[str]) -> tuple[Any, str]:
        return _join(where, name), f"is not a known key (known here: {', '.join(sorted(known))})"

    def not_finite(self, where: str, v: Any, f: Field) -> tuple[Any, str]:
        return where, f"is {v!r:.40}, not a finite number"

    def wrong(self, where: str, v: Any, tp: Any, f: Field) -> tuple[Any, str]:
        return where, f"must be {form(tp, f)}"

    def not_a_choice(self, where: str, v: Any, f: Field) -> tuple[Any, str]:
        return where, f"is '{v}', expected one of {', '.join(key_meta(f).choices)}"

    def below_minimum(self, where: str, v: Any, f: Field) -> tuple[Any, str]:
        return where, f"is {v}, less than {key_meta(f).minimum}"


WORDING = Wording()


def parse(cls: type, value: Any, fail: Fail, where: str = "", wording: Wording = WORDING) -> Any:
    """A YAML mapping as a `cls` section; every mistake raises fail(*wording.<kind of mistake>(...))."""
    if not isinstance(value, dict):
        raise fail(*wording.not_mapping(where))
    fs = fields(cls)
    for f in fs:
        if is_required(f) and f.name not in value:
            raise fail(*wording.missing(where, f.name))
    known = [f.name for f in fs]
    for k in value:
        if k not in known:
            raise fail(*wording.unknown(where, k, known))
    out = {f.name: _value(hints(cls)[f.name], value[f.name], f, fail, _join(where, f.name), wording)
           for f in fs if f.name in value and not (value[f.name] is None and not is_required(f))}
    obj = cls(**out)
    if hasattr(obj, "check"):
        obj.check(fail, where)
    return obj


def _value(tp: Any, v: Any, f: Field, fail: Fail, where: str, wording: Wording) -> Any:
    if is_infinite(v):
        raise fail(*wording.not_finite(where, v, f))
    alts = _alternatives(tp)
    if len(alts) > 1:
        for alt in alts:
            if _takes(alt, v):
                return _value(alt, v, f, fail, where, wording)
        raise fail(*wording.wrong(where, v, tp, f))
    tp = alts[0]
    origin = typing.get_origin(tp)
    if _is_value_class(tp):
        return tp.from_yaml(v, fail, where)
    if _is_section(tp):
        return parse(tp, v, fail, where, wording)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(v, list) or (item is str and not all(isinstance(x, str) and x for x in v)):
            raise fail(*wording.wrong(where, v, tp, f))
        return tuple(_value(item, x, f, fail, f"{where}[{i}]", wording) for i, x in enumerate(v))
    if not _takes(tp, v) or (tp is str and not v):
        raise fail(*wording.wrong(where, v, tp, f))
    m = key_meta(f)
    if tp is str and m.choices and v not in m.choices:
        raise fail(*wording.not_a_choice(where, v, f))
    if tp is int and m.minimum is not None and v < m.minimum:
        raise fail(*wording.below_minimum(where, v, f))
    return v


def form(tp: Any, f: Field | None = None) -> str:
    """How a value of this type is written, in words: for errors ('must be ...') and the key table."""
    if f is not None and key_meta(f).form:
        return key_meta(f).form
    alts = _alternatives(tp)
    if len(alts) > 1:
        return " or ".join(form(a, f) for a in alts)
    tp = alts[0]
    if _is_value_class(tp):
        return tp.FORM
    if _is_section(tp):
        return f"a mapping ({section_title(tp)})"
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return "a list of names" if item is str else f"a list of mappings ({section_title(item)})"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    if tp is str:
        choices = key_meta(f).choices if f is not None else ()
        if choices:
            return "one of " + ", ".join(f"`{c}`" for c in choices)
        return "a tensor name" if f is not None and key_meta(f).tensor else "a non-empty string"
    return {bool: "true or false", int: "a whole number", float: "a number"}.get(tp, "any value")


def section_title(cls: type) -> str:
    """A section's short name: the first line of its docstring, without the final period."""
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")


# ----------------------------------------------------------------------------------------- writing back


def dump(obj: Any) -> Any:
    """A parsed value as YAML data that parses back to an equal value: fields at their default are left out."""
    if _is_section(type(obj)):
        return {f.name: dump(getattr(obj, f.name)) for f in fields(obj)
                if is_required(f) or getattr(obj, f.name) != _default(f)}
    if hasattr(obj, "to_yaml"):
        return obj.to_yaml()
    if isinstance(obj, tuple):
        return [dump(x) for x in obj]
    return obj


def tagged(obj: Any, tag: str, where: str = "") -> Iterator[tuple[str, str]]:
    """(key path, value) for every string held by a field whose `KeyMeta` sets `tag` (e.g. "tensor")."""
    if isinstance(obj, tuple):
        for i, x in enumerate(obj):
            yield from tagged(x, tag, f"{where}[{i}]")
        return
    if not _is_section(type(obj)):
        return
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, str) and getattr(key_meta(f), tag):
            yield _join(where, f.name), v
        else:
            yield from tagged(v, tag, _join(where, f.name))


# ----------------------------------------------------------------------------------------- documentation


def _field_types(tp: Any) -> Iterator[Any]:
    """The section and value classes a field's type refers to."""
    for alt in _alternatives(tp):
        if typing.get_origin(alt) is tuple:
            alt = typing.get_args(alt)[0]
        if _is_section(alt) or _is_value_class(alt):
            yield alt


def sections(root: type) -> dict[type, list[str]]:
    """Every section class reachable from `root`, in reading order, with the key paths it appears at."""
    out: dict[type, list[str]] = {}

    def walk(cls: type, where: str) -> None:
        first = cls not in out
        out.setdefault(cls, []).append(where)
        for f in fields(cls):
            for sub in _field_types(hints(cls)[f.name]):
                if _is_section(sub) and (first or sub in out):
                    walk(sub, _join(where, f.name))

    walk(root, "")
    return out


def value_classes(root: type) -> list[type]:
    """The value classes the sections use, in reading order."""
    seen: dict[type, None] = {}
    for cls in sections(root):
        for f in fields(cls):
            seen.update((t, None) for t in _field_types(hints(cls)[f.name]) if _is_value_class(t))
    return list(seen)


def _default_text(f: Field) -> str:
    if is_required(f):
        return "**required**"
    d = _default(f)
    if d is None or d == () or d == {} or d == "":
        return "-"
    return f"`{str(d).lower() if isinstance(d, bool) else d}`"


def key_table(root: type) -> str:
    """Markdown: one table per section (key, value, default, meaning), then the value forms."""
    lines: list[str] = []
    for cls, paths in sections(root).items():
        where = ", ".join(f"`{p}`" for p in paths if p)
        _, _, doc = (cls.__doc__ or "").strip().partition("\n")
        lines += [f"### {section_title(cls)}", "", f"{f'At {where}. ' if where else ''}{' '.join(doc.split())}", "",
                  "| key | value | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            cells = [f"`{f.name}`", form(hints(cls)[f.name], f), _default_text(f), key_meta(f).doc]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += ["### Value forms", ""]
    for vc in sorted(value_classes(root), key=lambda c: len(c.__mro__)):  # a base form before its variants
        lines.append(f"- **{vc.FORM}**: {' '.join((vc.__doc__ or '').split())}")
    return "\n".join(lines).rstrip() + "\n"
