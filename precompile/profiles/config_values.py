"""Config values: how a profile refers to config.json. A value is a list of config keys (the first present
wins; dotted keys read nested sections and list entries; an entry may be a short arithmetic expression over keys,
parsed within fixed bounds and never with eval), a `{keys, default}` mapping, or the value itself. The profile
schema's sections (`precompile.profiles.sections`) declare their fields with these value classes.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from precompile.profiles.yaml_schema import Fail, is_number


def config_get(config: dict, key: str) -> Any:
    """config[key]; a dotted key reads a nested section (DBRX's `attn_config.kv_n_heads`) or a list's entry by its
    index (`layer_types.0`: layer 0's mixer)."""
    while key not in config:  # a loop, not recursion: a key with thousands of dots is no RecursionError
        head, dot, rest = key.partition(".")
        sub = config.get(head) if dot else None
        if isinstance(sub, list) and rest.partition(".")[0].isdigit():
            index, _, rest = rest.partition(".")
            sub = sub[int(index)] if len(index) < 10 and int(index) < len(sub) else None
            if not rest:
                return sub
        if not isinstance(sub, dict):
            return None
        config, key = sub, rest
    return config[key]


_EXPR_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
             ast.Div: operator.truediv}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


# An expression is a short formula (`4 * n_embd`); its length and nesting are bounded before it is parsed, so that
# neither the parser nor the evaluator, both recursive, can run out of stack (a RecursionError is no answer).
MAX_EXPRESSION = 200
MAX_NESTING = 16


def is_expression(key: str) -> bool:
    """A config reference entry that is arithmetic over config keys (`4 * n_embd`), not a single key."""
    return any(c in key for c in "+-*/() ")


def _parse_expression(text: str) -> tuple[ast.expr, list[str]]:
    """The expression's tree (config keys renamed to _0, _1, ...) and the keys; ValueError when it is not
    + - * / // over numbers, parentheses and config keys (dotted keys read nested sections)."""
    if len(text) > MAX_EXPRESSION:
        raise ValueError(f"it has {len(text):,} characters, more than {MAX_EXPRESSION}")
    depth = 0
    for c in text:  # parentheses: bounded before the parser recurses into them
        depth += (c == "(") - (c == ")")
        if depth > MAX_NESTING:
            raise ValueError(f"it nests parentheses more than {MAX_NESTING} deep")
    keys: list[str] = []

    def name(m: re.Match) -> str:
        keys.append(m.group(0))
        return f"_{len(keys) - 1}"

    try:
        tree = ast.parse(_NAME.sub(name, text), mode="eval").body
    except SyntaxError:
        raise ValueError("it does not parse") from None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.USub,
                                 *_EXPR_OPS)) or (isinstance(node, ast.Constant) and not is_number(node.value)):
            raise ValueError(f"{type(node).__name__} is not allowed")
    return tree, keys


def expression_value(config: dict, text: str) -> float | int | None:
    """An arithmetic expression over config keys, or None when a key it names is absent or not a number."""
    tree, keys = _parse_expression(text)
    values = [config_get(config, k) for k in keys]
    if not all(is_number(v) for v in values):
        return None

    def ev(node: ast.expr):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return values[int(node.id[1:])]
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand)
        return _EXPR_OPS[type(node.op)](ev(node.left), ev(node.right))

    try:
        return ev(tree)
    except ZeroDivisionError:
        return None
    except OverflowError:  # an int quotient past a float's range: no size, the caller says so
        return math.inf


# ----------------------------------------------------------------------------------------- value forms


@dataclass(frozen=True)
class ConfigValue:
    """a list of config.json keys (the first present wins; a dotted key such as `attn_config.kv_n_heads` reads
    a nested section, `layer_types.0` a list's entry; an entry may be arithmetic over keys with + - * / // and
    parentheses, e.g. `"4 * n_embd"`, present when every key it names is: GPT-J's FFN width is
    `[n_inner, "4 * n_embd"]`), a mapping `{keys: [...], default: ...}` (the default when none
    is present), or the value itself"""

    FORM: ClassVar[str] = "config value"
    keys: tuple[str, ...] = ()  # empty: `value` is the value itself
    default: Any = None
    value: Any = None

    @staticmethod
    def literal_ok(v: Any) -> bool:
        return is_number(v)

    @classmethod
    def from_yaml(cls, v: Any, fail: Fail, where: str) -> ConfigValue:
        if cls.literal_ok(v):
            return cls(value=v)
        default = None
        if isinstance(v, dict):
            if "keys" not in v:
                raise fail(f"{where}.keys", "is missing")
            for k in v:
                if k not in ("keys", "default"):
                    raise fail(f"{where}.{k}", "is not a known key (known here: default, keys)")
            default = v.get("default")
            if default is not None and not cls.literal_ok(default):
                raise fail(f"{where}.default", "has the wrong type")
            v, where = v["keys"], f"{where}.keys"
        if not (isinstance(v, list) and v and all(isinstance(k, str) for k in v)):
            raise fail(where, "must be a list of config.json keys, {keys, default}, or a value")
        for k in v:
            if is_expression(k):
                try:
                    _parse_expression(k)
                except ValueError as e:
                    raise fail(where, f"holds '{k}', not an arithmetic expression over config keys ({e})") from None
        return cls(keys=tuple(v), default=default)

    def to_yaml(self) -> Any:
        if not self.keys:
            return self.value
        return {"keys": list(self.keys), "default": self.default} if self.default is not None else list(self.keys)

    def read(self, config: dict) -> Any:
        """The value for this config.json: the first key present (not null), else the default."""
        if not self.keys:
            return self.value
        for k in self.keys:
            val = expression_value(config, k) if is_expression(k) else config_get(config, k)
            if val is not None:
                return val
        return self.default


@dataclass(frozen=True)
class SizeValue(ConfigValue):
    """a config value whose literal is a number or a boolean (`multi_query: true`)"""

    FORM: ClassVar[str] = "size value"

    @staticmethod
    def literal_ok(v: Any) -> bool:
        return is_number(v) or isinstance(v, bool)


@dataclass(frozen=True)
class FlagValue(ConfigValue):
    """a config value whose literal is true or false"""

    FORM: ClassVar[str] = "flag value"

    @staticmethod
    def literal_ok(v: Any) -> bool:
        return isinstance(v, bool)
