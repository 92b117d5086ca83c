"""The `precompile plan` command's report: SOURCE's config read (a hub id's config.json only, a model
directory, a converted OUT_DIR or a config.json file), its profile picked and resolved, the trade computed
(`precompile.plan.trade`) and rendered as the table, Markdown, JSON-ready figures or a plot. `plan_model` is the
library's entry point to it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from precompile.errors import UserError
from precompile.plan.trade import DEFAULT_BATCH_SIZES, MANIFEST, exact_figures, figures, sizes_from_spec, verdict_line
from precompile.profiles.catalog import conversion_profile, select_profile
from precompile.profiles.model_spec import ModelSpec
from precompile.profiles.profile_resolution import resolve

if TYPE_CHECKING:  # the loader imports torch: plans from a config need none
    from precompile.loader import Manifest


# --- sources ---------------------------------------------------------------------------------------------------

def _read_json_file(path: Path) -> dict:
    from precompile.io.file_safety import read_json

    try:
        data = read_json(path, "pass a config.json")
    except FileNotFoundError:
        raise UserError(f"{path} not found; check the path") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; pass a config.json")
    return data


def _hub_config(repo_id: str, revision: str | None) -> Path:
    """Only config.json of a hub repo (from the HF cache when offline)."""
    from huggingface_hub import hf_hub_download

    from precompile.io.hub import bound_hub_requests, hub_errors

    bound_hub_requests()
    with hub_errors("download", repo_id, revision, "config.json"):
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))


def _converted_manifest(out_dir: Path) -> Manifest:
    """A converted OUT_DIR's manifest (the loader, and with it torch, is imported only for one)."""
    from precompile.loader import Manifest, PrecompileLoadError

    try:
        return Manifest.read(out_dir)
    except PrecompileLoadError as e:
        raise UserError(str(e)) from None


def load_config(source: str, revision: str | None = None) -> tuple[dict, str, Path | None]:
    """(config, kind, weights directory or None) for a hub id, model dir, converted OUT_DIR or config file.

    kind is one of "hub", "local", "config", "converted".
    """
    from precompile.io.source import is_hub_id, read_config
    from precompile.io.weight_file_names import has_safetensors

    p = Path(source).expanduser()
    if p.exists() and revision is not None:
        raise UserError(f"--revision applies to hub ids, but SOURCE {source} is a local path; drop it")
    if p.exists() and not p.is_dir():  # a config.json (a FIFO or device is refused by the reader)
        return _read_json_file(p), "config", None
    if p.is_dir():
        if (p / MANIFEST).exists():
            return _converted_manifest(p).source.config, "converted", None
        config = read_config(p.resolve())
        return config, "local", (p.resolve() if has_safetensors(p) else None)
    if not is_hub_id(source):
        raise UserError(f"SOURCE {source} not found: no such file or directory, and it is not a hub repo id "
                        f"(org/name)")
    return _read_json_file(_hub_config(source, revision)), "hub", None


def parse_batch_sizes(text: str, flag: str = "--batch-sizes", example: str = "1,16,256,1024") -> tuple[int, ...]:
    """'1,16,256' -> (1, 16, 256): positive integers, sorted, without repeats (plan's --batch-sizes, bench's
    --batches); an error names `flag` and shows `example`."""
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"{flag} '{text}': '{part}' is not a positive integer; pass a comma-separated "
                            f"list such as {example}")
        out.add(int(part))
    return tuple(sorted(out))


def model_figures(source: str, kind: str, profile: str, config: dict, spec: ModelSpec,
                  batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, assume_parallel: bool = False) -> dict[str, Any]:
    """`plan --json`'s object without `exact`: the paper's figures of a resolved model (also the model card's)."""
    return {"source": source, "source_kind": kind, "profile": profile,
            "architecture": (config.get("architectures") or [None])[0], "model_type": config.get("model_type"),
            "assume_parallel": assume_parallel, **figures(sizes_from_spec(spec), batch_sizes)}


def plan_model(source: str, *, profile: str | None = None, assume_parallel: bool = False,
               batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, revision: str | None = None,
               dtype: str = "auto") -> dict[str, Any]:
    """The paper's figures for SOURCE (hub id, model dir, converted OUT_DIR or config.json path).

    With local weights (and no --assume-parallel, which describes a model that does not exist) the
    result also holds `exact`: byte figures from the real tensors, as `convert --dtype DTYPE` would write
    them (or `exact_unavailable`: why the weights could not be read). `verdict` is the headline: the
    exact figures' when there are some, else the paper's count's.
    """
    batch_sizes = tuple(batch_sizes)
    if not batch_sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes {list(batch_sizes)} must be positive integers; pass e.g. 1,16,256,1024")
    config, kind, weights = load_config(source, revision)
    if kind == "converted":  # the profile the conversion recorded, unless --profile overrides it
        out_dir = Path(source).expanduser()
        prof = conversion_profile(_converted_manifest(out_dir), config, str(out_dir / MANIFEST), profile)
    else:
        prof = select_profile(config, profile)
    spec = resolve(prof, config, assume_parallel=assume_parallel)
    out = model_figures(source, kind, prof.name, config, spec, batch_sizes, assume_parallel)
    if weights is not None and not assume_parallel:
        from precompile.plan.conversion_plan import plan_conversion

        try:
            out["exact"] = exact_figures(plan_conversion(str(weights), profile=profile, dtype=dtype), batch_sizes)
        except UserError as e:  # e.g. a partial download: the config's figures still stand
            out["exact_unavailable"] = str(e)
    return with_verdict(out)


def with_verdict(r: dict[str, Any]) -> dict[str, Any]:
    """r with its headline `verdict`: the exact bytes' when there are some, else the paper's count's."""
    r["verdict"] = r["exact"]["verdict"] if "exact" in r else r["paper_verdict"]
    return r


# --- presentation ----------------------------------------------------------------------------------------------

def _n(x: int) -> str:
    return f"{x:,}"


def _short(x: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return str(x)


def _bytes(x: int) -> str:
    for div, unit in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= div:
            return f"{x:,} B ({x / div:.1f} {unit})"
    return f"{x:,} B"


def _x(x: float) -> str:
    return f"{x:,.0f}x" if x >= 10 else f"{x:.1f}x"


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%" if x else "0%"


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(quantity, paper's count, exact from the weights) rows shared by the text and markdown views."""
    ex = r.get("exact")
    ffn = f"{r['ffn_kind'].upper()}, hidden {_n(r['ffn_hidden'])}" + (
        f", {r['n_experts']} experts" if r["n_experts"] > 1 else "") if r["ffn_hidden"] else "none"
    if r.get("dense_layers"):
        ffn += (f"; {r['dense_layers']} of {r['n_layers']} layers dense (GLU, hidden {_n(r['dense_ffn_hidden'])}), "
                f"layer 0 {'dense' if r['layer0_dense'] else 'MoE'}")
    qkv = r["row_width"] == r["q_width"] + 2 * r["e"]  # else latent attention or another mixer: the profile's widths
    rows = [
        ("block", r["block"] + (" (assumed)" if r["assume_parallel"] else ""), ""),
        ("attention", f"{r['attention']}: {r['n_heads']} heads, {r['n_kv_heads']} kv heads, head_dim {r['head_dim']}",
         ""),
        ("d / q width / e (k, v width)", f"{r['d']} / {r['q_width']} / {r['e']}", "") if qkv else
        ("d / projection outputs per token", f"{r['d']} / {r['row_width']}", ""),
        ("layers / vocab", f"{r['n_layers']} / {_n(r['vocab_size'])}", ""),
        ("FFN", ffn, ""),
        ("weights eliminated (layer 0)", _n(r["eliminated_weights"]),
         f"{_n(ex['eliminated_weights'])} in {len(ex['eliminated_tensors'])} tensors, "
         f"{_bytes(ex['eliminated_bytes'])}" if ex else ""),
        ("reads per token with precompute", _n(r["reads_with_per_token"]),
         _bytes(ex["reads_with_per_token_bytes"]) if ex else ""),
    ]
    exb = {b["batch"]: b for b in ex["batches"]} if ex else {}
    for b in r["batches"]:
        e = exb.get(b["batch"])
        rows.append((f"batch {b['batch']}: reads without -> with",
                     f"{_n(b['reads_without'])} -> {_n(b['reads_with'])} ({_x(b['reduction'])})",
                     f"{_n(e['reads_without_bytes'])} B -> {_n(e['reads_with_bytes'])} B ({_x(e['reduction'])})"
                     if e else ""))
    rows += [
        ("memory increase (table)", "+" + _n(r["memory_increase"]),
         f"table {ex['table_shape'][0]:,} x {ex['table_shape'][1]:,} {ex['dtype']}: {_bytes(ex['table_bytes'])}"
         if ex else ""),
        ("memory decrease", "-" + _n(r["memory_decrease"]), "-" + _bytes(ex["eliminated_bytes"]) if ex else ""),
        ("memory change", f"{r['memory_delta']:+,} ({_pct(r['memory_delta_relative'])})",
         f"{ex['memory_delta_bytes']:+,} B ({_pct(ex['memory_delta_relative'])}, both in {ex['dtype']})"
         if ex else ""),
        ("total weights" + (" (tied head once)" if r.get("tied") else ""),
         f"{_n(r['total_weights'])} ({_short(r['total_weights'])})",
         (f"{_bytes(ex['source_weight_bytes_in_output_dtype'])} -> {_bytes(ex['output_weight_bytes'])}"
          + (f" (source as stored: {_bytes(ex['source_weight_bytes'])})"
             if ex["source_weight_bytes"] != ex["source_weight_bytes_in_output_dtype"] else "")) if ex else ""),
        ("whole-model ceiling (1 layer of n)", f"1/{r['n_layers']} = {r['ceiling'] * 100:.1f}%", ""),
        ("token weight reads saved, batch 1", f"{r['batch1_reads_saved'] * 100:.2f}%",
         f"{ex['verdict']['reads_saved_batch1'] * 100:.2f}%" if ex else ""),
        ("break-even batch (B* = E / w)", _batch(r["break_even_batch"]),
         _batch(ex["verdict"]["break_even_batch"]) if ex else ""),
    ]
    if ex:
        rows.append(("embedding", "", "kept for the tied LM head" if ex["embedding_kept"] else "replaced by the table"))
    return rows


def _batch(b: float | None) -> str:
    return "none (the table adds no reads)" if b is None else f"{b:,.0f}"


def headline(v: dict[str, Any]) -> list[str]:
    """The whole-model figures the verdict rests on, in the output dtype: reads per token and memory."""
    unit = "B" if v["unit"] == "bytes" else "weights"
    return [f"figures: {v['basis']}",
            f"whole model, one token at batch 1: {v['reads_per_token_without']:,} -> {v['reads_per_token_with']:,} "
            f"{unit} read ({-v['reads_saved_batch1'] * 100:+.2f}%); break-even batch {_batch(v['break_even_batch'])}",
            f"memory of the converted model: {v['memory_before']:,} -> {v['memory_after']:,} {unit} "
            f"({v['memory_delta_relative'] * 100:+.1f}%, {v['memory_delta']:+,} {unit})"]


def to_text(r: dict[str, Any]) -> str:
    rows = table_rows(r)
    has_exact = "exact" in r
    head = ("", "paper's count (weights)", "exact (bytes, from the tensors)" if has_exact else "")
    w0 = max(len(x[0]) for x in rows + [head])
    w1 = max(len(x[1]) for x in rows + [head])
    lines = [f"{r['source']} (profile {r['profile']})", verdict_line(r["verdict"]),
             *(f"  {x}" for x in headline(r["verdict"])), ""]
    for row in [head] + rows:
        line = f"  {row[0]:<{w0}}  {row[1]:<{w1}}" + (f"  {row[2]}" if has_exact else "")
        lines.append(line.rstrip())
    if "exact_unavailable" in r:
        lines.append(f"no exact column: {r['exact_unavailable']}")
    return "\n".join(lines)


def to_markdown(r: dict[str, Any]) -> str:
    """A table to paste into a model card."""
    has_exact = "exact" in r
    head = ["", "paper's count (weights)"] + (["exact (bytes)"] if has_exact else [])
    lines = [f"Precomputing the first layer (arXiv 2402.13388) of `{r['source']}`:", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for q, paper, exact in table_rows(r):
        cells = [q, paper] + ([exact] if has_exact else [])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: str | os.PathLike) -> None:
    """Reduction factor against batch size (log-log) beside the memory change (matplotlib, optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed; pip install 'precompile[plot]'") from None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [x["batch"] for x in r["batches"]]
    a.loglog(xs, [x["reduction"] for x in r["batches"]], "o-", label="paper's count")
    if "exact" in r:
        a.loglog(xs, [x["reduction"] for x in r["exact"]["batches"]], "s--", label="exact bytes")
        a.legend()
    a.set_xlabel("batch size (tokens)")
    a.set_ylabel("layer-0 read reduction (x)")
    a.set_title("memory reads of layer 0")
    a.grid(True, which="both", alpha=0.3)
    vals = [r["memory_increase"], -r["memory_decrease"], r["memory_delta"]]
    b.bar(["increase (table)", "decrease", "change"], vals, color=["tab:red", "tab:green", "tab:blue"])
    b.axhline(0, color="black", linewidth=0.8)
    b.set_ylabel("weights")
    b.set_title(f"memory: {_pct(r['memory_delta_relative'])} of {_short(r['total_weights'])}")
    fig.suptitle(f"{r['source']} ({r['block']} block, {r['attention']})")
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}); choose a writable path for --plot") from None
    finally:
        plt.close(fig)
