"""What ships beside the code in configs/: where that directory is, and the support matrix generated into it.

`python -m precompile.profiles.support --write docs/support.md` classifies transformers' causal LMs (reading its
sources takes seconds) and writes the rows twice: as docs/support.md and as configs/_support_matrix.json,
which `precompile profiles` prints. This module reads that file with nothing heavier than json (no yaml,
torch or transformers), so the command starts as fast as `--help`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from precompile.errors import UserError

MATRIX_FILE = "_support_matrix.json"
SUPPORTED, REFUSED, NOT_YET = "supported", "refused", "not yet"
STATUSES = (SUPPORTED, REFUSED, NOT_YET)
REGENERATE = "python -m precompile.profiles.support --write docs/support.md"


def configs_dir() -> Path:
    """configs/ ships inside the wheel as package data (precompile/configs); in a checkout it sits beside it."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parent / "configs"


@dataclass(frozen=True)
class Layer0Shape:
    """What layer 0 looks like before its sequence mixer; '?' where the source does not tell."""

    mixer: str  # "attention", or the type transformers gives layer 0 (linear_attention, hybrid, ...)
    block: str  # serial | parallel | ?
    norm: str  # rms | layer | none | ?  (the norm in front of the mixer)
    projections: str  # separate | fused | latent | ?
    qk_norm: str  # - | per head | full width
    embedding_scale: str  # - | module | outside the module


@dataclass(frozen=True)
class Support:
    model_type: str
    architecture: str
    status: str  # supported | refused | not yet
    detail: str  # supported: the profile's name; otherwise the reason
    shape: Layer0Shape


def counts(rows: list[Support]) -> dict[str, int]:
    out = {s: 0 for s in STATUSES}
    for r in rows:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def to_text(rows: list[Support]) -> str:
    """`precompile profiles`: supported types with profile and block, then refused and not-yet ones with why."""
    out = []
    for status, head in ((SUPPORTED, ("MODEL TYPE", "ARCHITECTURE", "PROFILE", "BLOCK")),
                         (REFUSED, ("MODEL TYPE", "ARCHITECTURE", "REASON")),
                         (NOT_YET, ("MODEL TYPE", "ARCHITECTURE", "MISSING"))):
        sel = [r for r in rows if r.status == status]
        if not sel:
            continue
        table = [head] + [(r.model_type, r.architecture, r.detail, r.shape.block) if status == SUPPORTED
                          else (r.model_type, r.architecture, r.detail) for r in sel]
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        out.append(f"{status} ({len(sel)}):")
        for row in table:
            out.append("  " + "  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + "  " + row[-1])
        out.append("")
    other = [r for r in rows if r.status not in STATUSES]
    for r in other:
        out.append(f"unclassified: {r.model_type} ({r.architecture}): {r.detail}")
    out.append("any other architecture: write a profile (configs/README.md) and pass it with --profile")
    return "\n".join(out)


def to_json(rows: list[Support], transformers_version: str) -> str:
    """configs/_support_matrix.json: the rows docs/support.md shows, one JSON object per line."""
    lines = [json.dumps(asdict(r), sort_keys=True) for r in rows]
    return (f'{{"transformers": {json.dumps(transformers_version)},\n "rows": [\n  '
            + ",\n  ".join(lines) + "\n]}\n")


def shipped_matrix(path: Path | None = None) -> tuple[str, list[Support]]:
    """(transformers version, rows) of the classification shipped in configs/ (what `precompile profiles` prints)."""
    from precompile.io.file_safety import read_json

    path = path or configs_dir() / MATRIX_FILE
    try:
        data = read_json(path, f"regenerate it: {REGENERATE}")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; regenerate it: {REGENERATE}") from None
    return data["transformers"], [Support(**{**r, "shape": Layer0Shape(**r["shape"])}) for r in data["rows"]]


def installed_transformers() -> str | None:
    """The installed transformers' version, read from its package without importing it (a second of imports,
    which `precompile profiles` exists to avoid); None when it is not installed or says no version."""
    from importlib.util import find_spec

    spec = find_spec("transformers")
    if spec is None or not spec.origin:
        return None
    text = Path(spec.origin).read_text(encoding="utf-8")
    m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    return m.group(1) if m else None


def profiles_text() -> str:
    """`precompile profiles`: the shipped classification, then which transformers it describes."""
    version, rows = shipped_matrix()
    last = f"(the causal LMs of transformers {version}, as in docs/support.md"
    installed = installed_transformers()
    if installed is not None and installed != version:
        last += (f"; transformers {installed} is installed: python -m precompile.profiles.support classifies that one, "
                 f"reading its sources")
    return to_text(rows) + "\n" + last + ")"
