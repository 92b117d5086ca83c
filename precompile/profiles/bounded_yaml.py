"""The bounded YAML reader: every YAML this tool reads (profiles, a manifest's recorded profile, zoos, a
source's card front matter) is parsed within fixed bounds on its size, its values with aliases expanded and its
depth, and every failure to read a user's file is one line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from precompile.errors import UserError
from precompile.io.file_safety import check_regular

# libyaml's safe loader where PyYAML was built with it: the same documents, parsed ~10x faster (every
# command reads the shipped profiles)
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# Bounds on any YAML this tool reads (profiles, a manifest's recorded profile, zoos, a source's card front
# matter): the shipped profiles are a few KB with fewer than 1,000 values and 8 levels. Aliases are counted
# expanded, so a few KB of nested aliases (a "billion laughs") is refused before anything walks or compares it,
# and signals keep working because no step runs long inside C code.
YAML_MAX_BYTES = 1 << 20
YAML_MAX_NODES = 100_000
YAML_MAX_DEPTH = 100


class YamlTooLarge(ValueError):
    """A YAML document past the bounds above (its text, its values with aliases expanded, or its depth)."""


def parse_yaml(text: str) -> Any:
    """yaml.safe_load within the bounds above: YamlTooLarge names the bound, yaml.YAMLError a syntax error."""
    if len(text) > YAML_MAX_BYTES:
        raise YamlTooLarge(f"it has {len(text):,} characters, more than {YAML_MAX_BYTES:,}")
    loader = YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_extent(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_extent(root: yaml.Node) -> None:
    """Refuse a node graph whose expansion (aliases repeated where they stand) has more than YAML_MAX_NODES
    values or YAML_MAX_DEPTH levels, or that refers to itself; one visit per distinct node, no recursion."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()  # the nodes on the path being walked
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]

    def children(n: yaml.Node) -> list[yaml.Node]:
        if isinstance(n, yaml.SequenceNode):
            return n.value
        if isinstance(n, yaml.MappingNode):
            return [x for pair in n.value for x in pair]
        return []

    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            kids = children(node)
            size[key] = 1 + sum(size[id(c)] for c in kids)
            depth[key] = 1 + max((depth[id(c)] for c in kids), default=0)
            if size[key] > YAML_MAX_NODES:
                raise YamlTooLarge(f"its aliases expand to more than {YAML_MAX_NODES:,} values")
            if depth[key] > YAML_MAX_DEPTH:
                raise YamlTooLarge(f"it is nested more than {YAML_MAX_DEPTH} levels deep")
            continue
        if key in size:
            continue
        if key in open_:
            raise YamlTooLarge("an alias refers to a value that contains it")
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in size)


def read_yaml(path: Path, what: str, flag: str = "") -> Any:
    """Parse a user's YAML file (a profile, a zoo); every failure is one line naming the file."""
    return parse_user_yaml(read_yaml_text(path, what, flag), f"{what} {path}")


def read_yaml_text(path: Path, what: str, flag: str) -> str:
    check_regular(path, f"{what} ")
    try:
        if path.stat().st_size > YAML_MAX_BYTES * 4:  # UTF-8: at most 4 bytes a character
            raise UserError(f"{what} {path} has {path.stat().st_size:,} bytes, too large to be a {what}; fix it")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found; pass an existing YAML file{flag}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read ({e}); pass a readable UTF-8 YAML file") from None


def parse_user_yaml(text: str, label: str, fix: str = "fix it") -> Any:
    """parse_yaml, its failures one line naming `label`."""
    try:
        return parse_yaml(text)
    except YamlTooLarge as e:
        raise UserError(f"{label} is too large or too deep to be read ({e}); {fix}") from None
    except RecursionError:
        raise UserError(f"{label} is nested too deeply to be parsed; {fix}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{label} is not valid YAML{where}; {'fix its syntax' if fix == 'fix it' else fix}") from None
