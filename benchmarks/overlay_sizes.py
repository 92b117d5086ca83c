"""Overlay vs full conversion sizes for real models, from their published configs (no download).

Run: python benchmarks/overlay_sizes.py [/work/shared/reference/model_configs.json]
Prints a Markdown table: checkpoint size, table (= overlay) size, full conversion size. The table
width comes from the project's own profiles and `table_layout`, so it is the width `convert` writes:
(d, unless x is the tied embedding's stored row, scaled or not) + q_width + 2 * kv_width columns x vocab x dtype bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from precompile.errors import UserError  # noqa: E402
from precompile.plan.table_layout import table_layout  # noqa: E402
from precompile.profiles.catalog import select_profile  # noqa: E402
from precompile.profiles.profile_resolution import resolve  # noqa: E402

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def config_of(entry: dict) -> dict:
    """A config.json-like dict from a reference entry."""
    cfg = {k: v for k, v in entry.items() if not isinstance(v, dict) and v is not None}
    cfg.update(entry.get("other_config_keys") or {})
    if entry.get("norm_eps_field"):
        cfg[entry["norm_eps_field"]] = entry.get("norm_eps")
    cfg.update({k: v for k, v in (entry.get("rope") or {}).items() if v is not None})
    if entry.get("head_dim") is None and entry.get("head_dim_effective"):
        cfg["head_dim"] = entry["head_dim_effective"]
    bias = (entry.get("attention_bias") or {}).get("q_k_v_bias")
    if bias is not None and entry["model_type"] == "llama":
        cfg["attention_bias"] = bias
    if entry.get("tie_word_embeddings") is None and entry["model_type"] == "gemma":
        cfg["tie_word_embeddings"] = True
    return cfg


def gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    print("| model | checkpoint | overlay (table) | full conversion | table width |")
    print("|---|---:|---:|---:|---:|")
    for name, entry in data.items():
        total = (entry.get("checkpoint") or {}).get("total_size_bytes")
        cfg = config_of(entry)
        try:
            spec = resolve(select_profile(cfg, None), cfg)
        except UserError:
            continue  # no profile for this family (yet)
        if not total:
            continue
        layout = table_layout(spec, frozenset())
        nbytes = BYTES[entry.get("torch_dtype") or "float32"]
        table = layout.vocab_size * layout.width * nbytes
        d, qw, e = spec.hidden_size, spec.q_width, spec.kv_width
        eliminated = d * (qw + 2 * e) + d  # q/k/v weights and the attention norm's weight
        if bool(entry.get("attention_bias", {}).get("q_k_v_bias")):
            eliminated += qw + 2 * e
        if not spec.tied:
            eliminated += spec.vocab_size * d
        full = total - eliminated * nbytes + table
        print(f"| {name} | {gb(total)} | {gb(table)} ({100 * table / total:.1f}%) | {gb(full)} | {layout.width} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/reference/model_configs.json")
