"""Typed YAML sections, written once: validation, parsing and the documentation's key table come from them.

A section is a frozen dataclass whose fields are declared with `key()`: the field's type annotation says
which YAML values it takes, its default whether it is required, and its metadata the help text, the allowed
values and whether the value names a tensor. `parse` turns a YAML mapping into the dataclass, refusing an
unknown key, a missing required key or a value of the wrong type with `fail(key path, problem)`; a section
with a `check(fail, where)` method adds the rules that relate its fields. `dump` writes a section back as
YAML data, and `key_table` renders the Markdown tables a reader looks keys up in.

Types a field may have: `str`, `bool`, `float` (any number), `tuple[str, ...]` (a list of names),
`dict[str, Any]` (a free mapping), `Any`, another section, `tuple[Section, ...]` (a list of sections), a
value class (a class with `from_yaml`, `to_yaml` and a `FORM`, for values written in several ways), and
unions of these, told apart by the YAML value's kind (a string, a bool, a number, a list or a mapping);
`X | None` makes null the same as leaving the key out.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, field, fields, is_dataclass
from functools import cache
from typing import Any

Fail = Callable[[str, str], Exception]  # (key path, problem) -> the exception to raise


def key(doc: str, default: Any = MISSING, *, choices: tuple[str, ...] = (), tensor: bool = False,
        form: str = "") -> Any:
    """A section field: `doc` is its help text, `default` (none: required) its value when left out,
    `choices` the allowed strings, `tensor` whether a string value is a tensor name on disk, and `form` how
    the value is written where the type does not say it well (used in errors and in the key table)."""
    meta = {"doc": doc, "choices": tuple(choices), "tensor": tensor, "form": form}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


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
    if tp is float:
        return is_number(v)
    if origin is tuple:
        return isinstance(v, list)
    return isinstance(v, dict) if (origin is dict or _is_section(tp)) else True


def parse(cls: type, value: Any, fail: Fail, where: str = "") -> Any:
    """A YAML mapping as a `cls` section; every mistake raises fail(key path, problem)."""
    if not isinstance(value, dict):
        raise fail(where, "must be a mapping")
    fs = fields(cls)
    for f in fs:
        if is_required(f) and f.name not in value:
            raise fail(_join(where, f.name), "is missing")
    known = {f.name for f in fs}
    for k in value:
        if k not in known:
            raise fail(_join(where, k), f"is not a known key (known here: {', '.join(sorted(known))})")
    out = {f.name: _value(hints(cls)[f.name], value[f.name], f, fail, _join(where, f.name))
           for f in fs if f.name in value and not (value[f.name] is None and not is_required(f))}
    obj = cls(**out)
    if hasattr(obj, "check"):
        obj.check(fail, where)
    return obj


def _value(tp: Any, v: Any, f: Field, fail: Fail, where: str) -> Any:
    if is_infinite(v):
        raise fail(where, f"is {v!r:.40}, not a finite number")
    alts = _alternatives(tp)
    if len(alts) > 1:
        for alt in alts:
            if _takes(alt, v):
                return _value(alt, v, f, fail, where)
        raise fail(where, f"must be {form(tp, f)}")
    tp = alts[0]
    origin = typing.get_origin(tp)
    if _is_value_class(tp):
        return tp.from_yaml(v, fail, where)
    if _is_section(tp):
        return parse(tp, v, fail, where)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(v, list) or (item is str and not all(isinstance(x, str) and x for x in v)):
            raise fail(where, f"must be {form(tp, f)}")
        return tuple(_value(item, x, f, fail, f"{where}[{i}]") for i, x in enumerate(v))
    if not _takes(tp, v) or (tp is str and not v):
        raise fail(where, f"must be {form(tp, f)}")
    if tp is str and f.metadata["choices"] and v not in f.metadata["choices"]:
        raise fail(where, f"is '{v}', expected one of {', '.join(f.metadata['choices'])}")
    return v


def form(tp: Any, f: Field | None = None) -> str:
    """How a value of this type is written, in words: for errors ('must be ...') and the key table."""
    if f is not None and f.metadata.get("form"):
        return f.metadata["form"]
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
        choices = f.metadata["choices"] if f is not None else ()
        if choices:
            return "one of " + ", ".join(f"`{c}`" for c in choices)
        return "a tensor name" if f is not None and f.metadata["tensor"] else "a non-empty string"
    return {bool: "true or false", float: "a number"}.get(tp, "any value")


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
    """(key path, value) for every string held by a field whose metadata sets `tag` (e.g. "tensor")."""
    if isinstance(obj, tuple):
        for i, x in enumerate(obj):
            yield from tagged(x, tag, f"{where}[{i}]")
        return
    if not _is_section(type(obj)):
        return
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, str) and f.metadata.get(tag):
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
            cells = [f"`{f.name}`", form(hints(cls)[f.name], f), _default_text(f), f.metadata["doc"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += ["### Value forms", ""]
    for vc in sorted(value_classes(root), key=lambda c: len(c.__mro__)):  # a base form before its variants
        lines.append(f"- **{vc.FORM}**: {' '.join((vc.__doc__ or '').split())}")
    return "\n".join(lines).rstrip() + "\n"
