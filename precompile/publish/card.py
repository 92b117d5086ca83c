"""OUT_DIR's model card (README.md): the hub's metadata, what was done, the figures, how to load it.

The card is rendered from typed inputs only (the conversion plan, the source's own card
metadata, an optional self-check summary), never from clocks or local paths, so equal
inputs give identical bytes. It is one of the manifest's `outputs`, so `verify`'s
integrity check covers it; `verify --update-card` splices a verification section into
it and records its new sha256 in the manifest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from precompile.check.check_report import check_counts, fmt_metrics, fmt_threshold
from precompile.check.file_checks import read_out_dir
from precompile.errors import UserError
from precompile.io.file_safety import write_json
from precompile.io.hashed_copy import file_sha256
from precompile.io.out_dir import OutDir
from precompile.io.signals import signals_deferred
from precompile.io.safetensors_files import dtype_name
from precompile.loader import FORMAT_VERSION, MANIFEST, Manifest
from precompile.plan.plan_report import headline, model_figures, to_markdown, with_verdict
from precompile.plan.trade import exact_figures, verdict_line
from precompile.version import __version__

if TYPE_CHECKING:  # for annotations only: planning imports torch
    from precompile.plan.conversion_plan import ConversionPlan

CARD_FILE = "README.md"  # OUT_DIR's card; the source's own README.md is read for its metadata, never carried
PAPER = "https://arxiv.org/abs/2402.13388"
PROJECT = "precompile"
VERIFY_BEGIN = "<!-- precompile:verify -->"
VERIFY_END = "<!-- /precompile:verify -->"
# The card is written before OUT_DIR gets its final path and before any push, so it cannot name either:
# the snippet runs as is from inside the directory and says what to put there otherwise.
LOAD_DIR_NOTE = "this directory (run from inside it); else its path, or its hub repo id once pushed"


@dataclass(frozen=True)
class SelfCheckSummary:
    """What the card says about the conversion's self-check. No timing: the card must not change between runs."""

    passed: bool
    summary: str  # e.g. "layer 0's outputs within 1.2e-07 of transformers' (bound 3.1e-06)"


@dataclass(frozen=True)
class SourceCard:
    """The hub metadata copied from the source's own README.md front matter (all optional)."""

    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    language: tuple[str, ...] = ()


def read_source_card(root: Path) -> SourceCard:
    """license/language from root/README.md's front matter; a missing or malformed card gives an empty one.

    The card is a file of SOURCE like any other: a FIFO or device in its place, or a link leading out of SOURCE,
    is refused (`source_file`); its front matter is read within the YAML bounds of every YAML this tool reads.
    """
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    from precompile.profiles.bounded_yaml import YAML_MAX_BYTES, parse_yaml
    from precompile.io.source import SOURCE_CARD, source_file

    path = source_file(root, SOURCE_CARD, "model card")
    try:
        with open(path, "rb") as f:  # the front matter opens the file: a card's tail is never needed
            head = f.read(YAML_MAX_BYTES).decode("utf-8-sig", errors="replace")
        match = REGEX_YAML_BLOCK.search(head)
        meta = parse_yaml(match.group(2)) if match else None
    except (OSError, ValueError, RecursionError, yaml.YAMLError):  # YamlTooLarge is a ValueError
        return SourceCard()
    if not isinstance(meta, dict):
        return SourceCard()

    def text(key: str) -> str | None:
        v = meta.get(key)
        return v.strip() if isinstance(v, str) and v.strip() else None

    lang = meta.get("language")
    langs = [lang] if isinstance(lang, str) else lang if isinstance(lang, list) else []
    return SourceCard(license=text("license"), license_name=text("license_name"), license_link=text("license_link"),
                      language=tuple(x.strip() for x in langs if isinstance(x, str) and x.strip()))


def source_label(plan: ConversionPlan) -> str:
    """The source as the card names it: its hub id, or a local directory's name (never a local path)."""
    return plan.source.id or Path(plan.source.path or plan.source.root).name


def card_figures(plan: ConversionPlan) -> dict[str, Any]:
    """`plan --json`'s object for this conversion (exact byte figures for a full one, whose tensors are all read)."""
    r = model_figures(source_label(plan), "hub" if plan.source.id else "local", plan.profile.name, plan.config,
                      plan.spec)
    if plan.kind == "full":
        r["exact"] = exact_figures(plan)
    return with_verdict(r)


def front_matter(plan: ConversionPlan, src: SourceCard) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if plan.source.id:
        meta["base_model"] = plan.source.id
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation"})
    for key in ("license", "license_name", "license_link"):
        if getattr(src, key):
            meta[key] = getattr(src, key)
    if src.language:
        meta["language"] = list(src.language)
    model_type = plan.config.get("model_type")
    meta["tags"] = [PROJECT, "arxiv:2402.13388"] + ([model_type] if isinstance(model_type, str) else [])
    return meta


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def _figure_lines(plan: ConversionPlan, r: dict[str, Any]) -> list[str]:
    lay = plan.layout
    ex = r.get("exact")
    cols = ", ".join(f"`{c.name}` [{c.start}:{c.stop}]" for c in lay.columns)
    dtype = dtype_name(plan.model_dtype)
    b1 = r["batches"][0]
    lines = [
        f"- **Table**: {lay.vocab_size:,} x {lay.width:,} {dtype}, {plan.table_bytes:,} bytes "
        f"({plan.table_bytes / 2**20:.1f} MiB); columns {cols}.",
        f"- **Weights eliminated** (layer 0): {r['eliminated_weights']:,} (the paper's count)"
        + (f"; exactly {ex['eliminated_weights']:,} weights in {len(ex['eliminated_tensors'])} tensors, "
           f"{ex['eliminated_bytes']:,} bytes" if ex else "")
        + (" (the embedding stays for the tied LM head)" if lay.keep_embedding else "") + ".",
        f"- **Reads per token** in layer 0: {r['reads_with_per_token']:,} values with the table; at batch "
        f"{b1['batch']}: {b1['reads_without']:,} -> {b1['reads_with']:,} ({b1['reduction']:,.1f}x fewer).",
        f"- **Memory change**: {r['memory_delta']:+,} weights ({_pct(r['memory_delta_relative'])} of "
        f"{r['total_weights']:,}" + (", the tied head counted once" if r["tied"] else "") + ")"
        + (f"; exactly {ex['memory_delta_bytes']:+,} bytes ({_pct(ex['memory_delta_relative'])}, the source in "
           f"{ex['dtype']} vs the output)" if ex else "")
        + ".",
    ]
    return lines


def _verdict_lines(r: dict[str, Any]) -> list[str]:
    """The card's headline: plan's verdict line and the whole-model figures it rests on."""
    v = r["verdict"]
    line = verdict_line(v)
    return [f"**{line[0].upper()}{line[1:]}**", "", *(f"- {x}" for x in headline(v)), "",
            'The thresholds and formulas are in the precompile README ("Is it worth it?").']


def _self_check_text(check: SelfCheckSummary | None) -> str:
    if check is None:
        return "Not run."
    return f"{'Passed' if check.passed else 'FAILED'}: {check.summary}"


def _load_text(plan: ConversionPlan) -> list[str]:
    lines = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model_dir = "."  # {LOAD_DIR_NOTE}',
        "model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(model_dir)",
        "```",
        "",
        "`trust_remote_code=True` runs this repository's `precompile_loader.py`, which imports only torch, "
        "safetensors, transformers and huggingface_hub. With the `precompile` package installed "
        "(a local directory only):",
        "",
        "```python",
        "import precompile",
        "",
        "model = precompile.load(model_dir)",
        "```",
    ]
    if plan.kind == "overlay":
        src = plan.source
        if src.id:
            lines += ["", f"This is an overlay: it needs its base model `{src.id}` at revision `{src.revision}`. "
                          f"Loading fetches that revision from the hub (or takes it from the HF cache) and refuses "
                          f"base files whose sha256 differs from the one recorded in `{MANIFEST}`."]
        else:
            lines += ["", f"This is an overlay of the local directory `{source_label(plan)}`: loading finds it at the "
                          f"path recorded in `{MANIFEST}`, or pass `base=` its directory to `precompile.load`."]
    return lines


def render_card(plan: ConversionPlan, source_card: SourceCard, self_check: SelfCheckSummary | None = None) -> str:
    """README.md for OUT_DIR: YAML front matter the hub indexes, then what was done, figures, checks, loading."""
    label = source_label(plan)
    meta = yaml.safe_dump(front_matter(plan, source_card), sort_keys=False, allow_unicode=True,
                          default_flow_style=False)
    try:
        r = card_figures(plan)
        worth = _verdict_lines(r)
        figures = [*_figure_lines(plan, r), "",
                   "<details><summary>All figures (<code>precompile plan</code>)</summary>", "",
                   to_markdown(r), "", "</details>"]
    except UserError as e:  # the card never fails a conversion: plan's whole-model count may lack a size
        worth = figures = [f"Not available: {e}"]
    link = f"[`{label}`](https://huggingface.co/{label})" if plan.source.id else f"`{label}`"
    at = f" at revision `{plan.source.revision}`" if plan.source.revision else ""
    residual = "the residual input plus layer 0's FFN output" if plan.spec.folds_ffn else "the residual input"
    work = f"{residual} and the q, k, v projections" if plan.layout.x_in_table else "the q, k, v projections"
    kind = ("It is an overlay: it holds only the table and loads over the unchanged base model. "
            if plan.kind == "overlay" else "")
    lines = [
        "---", meta.rstrip("\n"), "---", "",
        f"# {label.split('/')[-1]} with its first layer precomputed", "",
        f"This is {link}{at} converted with `precompile`: layer 0's "
        f"token-only work ({work}) was computed once for every vocabulary entry "
        f"and stored as a table, as in [Transformer tricks: Precomputing the first layer]({PAPER}) "
        f"(arXiv 2402.13388). {kind}At run time layer 0 reads one table row per token instead of those weights, "
        f"and everything else (attention, RoPE, KV cache, generation) is transformers' own.", "",
        "## Is it worth it?", "",
        *worth, "",
        "## Figures", "",
        *figures, "",
        "## Self-check", "",
        _self_check_text(self_check), "",
        "## Verification", "",
        VERIFY_BEGIN,
        "Not run yet: `precompile verify DIR --update-card` records its checks here.",
        VERIFY_END, "",
        "## How to load", "",
        *_load_text(plan), "",
        "## Format", "",
        f"- manifest: `{MANIFEST}`, format version {FORMAT_VERSION}, kind `{plan.kind}`",
        f"- profile: `{plan.profile.name}` ({plan.spec.block} block, {plan.spec.attention_kind})",
        f"- dtype: {dtype_name(plan.model_dtype)} (table computed in {dtype_name(plan.compute_dtype)})",
        f"- tool: precompile {__version__}",
    ]
    return "\n".join(lines) + "\n"


def _with_card(out_dir: Path, card: Path) -> dict:
    """OUT_DIR's manifest, to be written, with `card`'s sha256 (and size, where sizes are recorded) as its
    README.md output."""
    manifest = Manifest.read(out_dir)
    sizes = manifest.output_sizes
    return replace(manifest, outputs={**manifest.outputs, CARD_FILE: file_sha256(card)},
                   output_sizes=None if sizes is None else {**sizes, CARD_FILE: card.stat().st_size}).to_dict()


def record_card(out_dir: Path) -> str:
    """Put README.md's sha256 into the manifest's outputs (when OUT_DIR has a manifest yet); returns it."""
    if (out_dir / MANIFEST).exists():
        write_json(out_dir / MANIFEST, _with_card(out_dir, out_dir / CARD_FILE))
    return file_sha256(out_dir / CARD_FILE)


def write_card(out_dir: Path, plan: ConversionPlan, self_check: SelfCheckSummary | None = None) -> str:
    """Write OUT_DIR/README.md (into a conversion's temporary directory) and record it; returns its sha256."""
    text = render_card(plan, read_source_card(plan.source.root), self_check)
    (out_dir / CARD_FILE).write_text(text, encoding="utf-8")
    return record_card(out_dir)


# --- verify --update-card ----------------------------------------------------------------------------------------

def check_card(out_dir: Path) -> None:
    """`--update-card` needs a card the manifest records; say so before verify runs for minutes."""
    out_dir, manifest = read_out_dir(out_dir)
    if CARD_FILE not in manifest.outputs or not (out_dir / CARD_FILE).is_file():
        raise UserError(f"{out_dir} has no {CARD_FILE} model card recorded in its {MANIFEST} (converted by an older "
                        f"precompile); convert again to get one, or drop --update-card")


def verify_section(result: dict) -> str:
    """The card's verification section: one line of outcome, then each check with its threshold."""
    checks = result["checks"]
    failed = [c["name"] for c in checks if not c["passed"]]
    ref = result["reference"]
    ref = f"`{ref}` at revision `{result['revision']}`" if result.get("revision") else f"`{Path(ref).name}`"
    head = (f"**{'FAILED' if failed else 'Passed'}**: {check_counts(checks)} of the checks of "
            f"`precompile verify` against the original {ref} ({result['dtype']}, {result['prompts']} prompts)"
            + (f"; failed: {', '.join(failed)}" if failed else "") + ".")

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    rows = ["| check | result | measured | threshold |", "|---|---|---|---|"]
    for c in checks:
        res = "skip" if c.get("skipped") else "PASS" if c["passed"] else "FAIL"
        rows.append(f"| {c['name']} | {res} | {cell(fmt_metrics(c))} | {cell(fmt_threshold(c))} |")
    return "\n".join([VERIFY_BEGIN, head, "", *rows, VERIFY_END])


def splice_verify(card: str, section: str) -> str:
    """Replace the card's verification section, or append one when the markers are gone."""
    start, end = card.find(VERIFY_BEGIN), card.find(VERIFY_END)
    if start >= 0 and end > start:
        return card[:start] + section + card[end + len(VERIFY_END):]
    return card.rstrip("\n") + "\n\n## Verification\n\n" + section + "\n"


def update_card(out_dir: str | os.PathLike, result: dict) -> str:
    """Splice verify's result into OUT_DIR's card and record the card's new sha256; no other file changes.

    Refused (the card untouched) when verify's integrity check failed: rehashing then would bless whatever
    changed. Both files are replaced by rename, with signals held between the two.
    """
    out = Path(out_dir)
    integrity = next((c for c in result["checks"] if c["name"] == "integrity"), None)
    if integrity is None or not integrity["passed"]:
        return f"{out / CARD_FILE} not updated: OUT_DIR's files differ from its {MANIFEST}"
    card = out / CARD_FILE
    tmp_card, tmp_manifest = out / f".{CARD_FILE}.tmp", out / f".{MANIFEST}.tmp"
    with OutDir.resolve(out).lock():  # one writer of OUT_DIR's files (held already by `verify --update-card`)
        try:
            tmp_card.write_text(splice_verify(card.read_text(encoding="utf-8"), verify_section(result)),
                                encoding="utf-8")
            write_json(tmp_manifest, _with_card(out, tmp_card))
            with signals_deferred():
                os.replace(tmp_card, card)
                os.replace(tmp_manifest, out / MANIFEST)
        finally:
            tmp_card.unlink(missing_ok=True)
            tmp_manifest.unlink(missing_ok=True)
    return f"updated {card} with the verification summary"
