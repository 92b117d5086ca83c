"""Which of transformers' causal LMs precompile supports, derived from transformers itself.

Every model type of transformers' causal-LM registry (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`) is
classified from facts: its config class's defaults (`is_encoder_decoder`, `kv_lora_rank`,
`layer_types`, a nested `text_config`) and the source of its modeling module, read as text and parsed
(never imported): what layer 0's decoder layer feeds its attention, whether the FFN reads the same
normed input (a parallel block), how the embedding is scaled, how q/k are projected and normed, and
whether absolute position embeddings are added before layer 0. A shipped profile that
`select_profile` picks and `resolve` accepts makes a type *supported*; configs/_refused.yaml and
the signals name *refused* types; everything else is *not yet*, with what the schema lacks (probed
by validating a changed profile, so the matrix follows the schema as it grows). What the signals
cannot decide is data in configs/_support.yaml, each entry with its reason.

`python -m precompile.profiles.support --write docs/support.md` regenerates the matrix and, from the same rows,
configs/_support_matrix.json, which `precompile profiles` prints without reading transformers at all
(scanning its sources takes seconds; tests/profiles/test_support.py fails when either file is stale).
"""

from __future__ import annotations

import copy
import re
import warnings
from functools import cache
from pathlib import Path

from precompile.errors import UserError
from precompile.profiles.bounded_yaml import read_yaml
from precompile.profiles.catalog import builtin_profiles, refusals, select_profile
from precompile.profiles.profile_resolution import Profile, resolve, validate_profile
from precompile.profiles.shipped import (
    MATRIX_FILE, NOT_YET, REFUSED, SUPPORTED, Layer0Shape, Support, configs_dir, counts, to_json, to_text)
from precompile.profiles.transformers_sources import SourceFacts, class_index, source_facts

ATTENTION_LAYERS = ("full_attention", "sliding_attention", "chunked_attention", "attention")
OVERRIDES_FILE = "_support.yaml"


# --------------------------------------------------------------------------------------------- classify


def _overrides() -> dict[str, dict]:
    """configs/_support.yaml: model_type -> {status, reason} for what the signals cannot decide."""
    path = configs_dir() / OVERRIDES_FILE
    data = read_yaml(path, "support overrides") or {}
    out = {}
    for mt, entry in (data.get("overrides") or {}).items():
        if not (isinstance(entry, dict) and entry.get("status") in (REFUSED, NOT_YET) and entry.get("reason")):
            raise UserError(f"{path}: overrides.{mt} must be {{status: refused or not yet, reason: text}}; fix it")
        out[mt] = entry
    return out


def _config(model_type: str):
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoConfig.for_model(model_type)
        except Exception:  # noqa: BLE001 - a config class whose defaults do not validate: no facts from it
            return None


def _text_dict(cfg) -> dict:
    """The (text) config's values as config.json would hold them; {} without a config."""
    if cfg is None:
        return {}
    try:
        return cfg.get_text_config().to_dict()
    except ValueError:  # several text configs (e.g. an encoder and a decoder): the top-level values
        return cfg.to_dict()


def _layer0_mixer(cfg) -> str:
    """The kind transformers gives layer 0 (`layer_types[0]`: full_attention, linear_attention, ...)."""
    try:
        types = getattr(cfg.get_text_config(), "layer_types", None) if cfg is not None else None
    except (ValueError, AttributeError):  # several text configs, or a per-layer attribute
        types = None
    return str(types[0]) if isinstance(types, (list, tuple)) and types else "attention"


def _composite(cfg) -> bool:
    """config.json nests the language model's sizes (text_config), where a profile reads top-level keys."""
    try:
        return cfg is not None and cfg.get_text_config() is not cfg
    except ValueError:
        return True


# Layer-0 shapes the source facts can find, each with a probe: the change to the shipped llama profile that
# expresses it. The schema can express the shape when validate_profile and resolve accept the changed profile,
# so the matrix follows the schema as it grows instead of a list kept by hand.
_PROBE_CONFIG = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8,
                 "num_hidden_layers": 1, "rms_norm_eps": 1e-6, "intermediate_size": 8, "head_dim": 16}
_PROBES = {
    "no norm before attention": lambda d: d.pop("attn_norm"),
    "q/k norms over the whole projection width": lambda d: d.update(
        qk_norm={"over": "projection", "q": d["attn_norm"], "k": d["attn_norm"]}),
    "q/k norms after a fused qkv projection": lambda d: d.update(
        projections=[{"role": "qkv", "weight": "qkv.weight", "module": "qkv"}],
        qk_norm={"q": d["attn_norm"], "k": d["attn_norm"]}),
    "embedding multiplier applied outside the embedding module": lambda d: d["embedding"].update(
        multiplier={"value": 2.0}),
    "latent attention (MLA: low-rank q/kv projections with a norm between, split rotary part)": lambda d: d.update(
        projections=[{"role": "mla_q", "weight": "q_b.weight", "module": "q_b", "width": 64,
                      "low_rank": {"weight": "q_a.weight", "module": "q_a", "rank": 8, "norm": d["attn_norm"]}},
                     {"role": "mla_kv", "weight": "kv_a.weight", "module": "kv_a", "width": 12,
                      "out_norm": {**d["attn_norm"], "width": 8}}]),
}


@cache
def expressible(shape: str) -> bool:
    """Whether the profile schema can express a layer-0 shape named in _PROBES."""
    llama = next(p for p in builtin_profiles() if p.name == "llama")
    data = copy.deepcopy(llama.data)
    _PROBES[shape](data)
    try:
        validate_profile(data, "probe")
        resolve(Profile("probe", "probe", data), _PROBE_CONFIG)
    except (UserError, KeyError, TypeError, ValueError):
        return False
    return True


def _unknowns(facts: SourceFacts) -> list[str]:
    """What keeps a profile from expressing layer 0, or the loader from running the converted model, that the
    source shows: a part it does not name, an attention input computed inside the layer, a read of the
    embedding's weight (each found by writing profiles for the matrix's "should do" rows:
    tests/profiles/test_support.py)."""
    s, out = facts.shape, []
    if not facts.found:
        return out
    if s.block == "?":
        out.append("the source does not show whether layer 0's FFN reads the attention's input (serial or parallel "
                   "block)")
    if s.norm == "?":
        out.append("the norm in front of layer 0's attention is not a known RMSNorm or LayerNorm class")
    if s.projections == "?":
        out.append(f"layer 0's attention projects with none of the modules a profile names (separate q/k/v, one fused "
                   f"qkv, latent): it builds {', '.join(facts.attention_attrs) or 'no modules'}")
    if facts.attn_input != "in":
        out.append("layer 0's attention norm reads a value the layer computes from its input first (not the "
                   "residual stream itself), which a profile cannot express")
    v_norms = [a for a in facts.attention_attrs if re.fullmatch(r"(v|value)_?(norm|layernorm|ln)", a)]
    if v_norms:
        out.append(f"layer 0's attention normalises v ({', '.join(v_norms)}), and a profile's qk_norm names q's and "
                   "k's norms only")
    called = [r[:-len("(extra arguments)")] for r in facts.attention_readers if r.endswith("(extra arguments)")]
    readers = [r for r in facts.attention_readers if not r.endswith("(extra arguments)")]
    if called:
        out.append(f"layer 0's attention calls {', '.join(called)} with more than the input (Moshi's codebook "
                   "index), which the loader's table slice does not take")
    if readers:
        out.append(f"layer 0's attention also applies {', '.join(readers)} to its input, which the table does not "
                   "hold (the converted attention would read the un-normed input there)")
    if facts.normed_residual:
        out.append(f"layer 0 adds its attention norm's output ({facts.normed_residual}) to the residual stream, and "
                   "the loader replaces that norm with an identity")
    if facts.embeds_through:
        out.append(f"the model's forward passes the embedding's output through {', '.join(facts.embeds_through)} "
                   "(e.g. other modalities' features in place of some tokens' rows), which the table's q/k/v do not "
                   "follow")
    if facts.shared_norm:
        out.append(f"the embedding's norm is also the final norm (one module, self.{facts.shared_norm}, called before "
                   "and after the layers): the loader cannot replace it by an identity for layer 0 alone")
    if facts.reads_embedding_weight:
        out.append(f"the model's forward reads the embedding's weight ({facts.reads_embedding_weight}), whose "
                   "values the converted model's table lookup holds only when the LM head is tied")
    return out


def _shapes(cfg, facts: SourceFacts | None) -> tuple[list[str], list[str]]:
    """(what the profile schema lacks for this layer 0, the special shapes it has that the schema expresses)."""
    lacks: list[str] = []
    found: list[str] = []
    if _text_dict(cfg).get("kv_lora_rank"):
        found.append("latent attention (MLA: low-rank q/kv projections with a norm between, split rotary part)")
    if facts is not None:
        s = facts.shape
        if s.mixer not in ATTENTION_LAYERS:
            return lacks + [f"layer 0's sequence mixer is not softmax attention (layer_types[0] = {s.mixer})"], found
        lacks += _unknowns(facts)
        d = _text_dict(cfg)
        if not d.get("kv_lora_rank") and d.get("v_head_dim") and d.get("head_dim") and d["v_head_dim"] != d["head_dim"]:
            lacks.append(f"v's heads are narrower or wider than q's and k's (v_head_dim {d['v_head_dim']}, head_dim "
                         f"{d['head_dim']}), and a profile's q/k/v share one head_dim")
        found += [shape for shape, present in (
            ("no norm before attention", s.norm == "none"),
            ("q/k norms over the whole projection width", s.qk_norm == "full width"),
            ("q/k norms after a fused qkv projection", s.qk_norm == "per head" and s.projections == "fused"),
            ("embedding multiplier applied outside the embedding module", s.embedding_scale == "outside the module"),
        ) if present]
    return lacks + [f for f in found if not expressible(f)], [f for f in found if expressible(f)]


def _native(model_type: str, arch: str) -> bool:
    """True when `arch` is defined by the model type's own modeling module (not borrowed from another)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    path = class_index().get(arch)
    return path is not None and path.parent.name == model_type_to_module_name(model_type)


def _profile_blocks(prof: Profile) -> str:
    """The block kinds a profile can resolve to: its own, and those its variants set."""
    blocks = {prof.block} | {v["set"]["block"] for v in prof.data.get("variants") or [] if "block" in v["set"]}
    return prof.block if len(blocks) == 1 else " or ".join(sorted(blocks)) + " (by config)"


def classify(model_type: str, arch: str, shipped: list[Profile], refused: dict[str, str],
             overrides: dict[str, dict]) -> Support:
    """One registry entry's status, from the shipped profiles, refusals, overrides and the facts."""
    cfg = _config(model_type)
    mixer = _layer0_mixer(cfg)
    facts = source_facts(arch, mixer)
    shape = facts.shape if facts else Layer0Shape(mixer, "?", "?", "?", "-", "-")
    if model_type in refused:
        return Support(model_type, arch, REFUSED, refused[model_type], shape)
    if cfg is not None:
        config = {**cfg.to_dict(), "architectures": [arch], "model_type": model_type}
        try:
            prof = select_profile(config, shipped=shipped)
            spec = resolve(prof, config)
        except UserError:
            pass
        else:
            if model_type not in prof.model_types and not _native(model_type, arch):
                return Support(model_type, arch, NOT_YET, f"transformers builds {arch} from "
                               f"{type(cfg).__name__}, and no shipped profile lists "
                               f"model type {model_type}", shape)
            shape = Layer0Shape(shape.mixer, _profile_blocks(prof),
                                spec.attn_norm.kind if spec.attn_norm else "none", shape.projections,
                                shape.qk_norm if shape.qk_norm != "-" or not spec.qk_norms else "per head",
                                "module" if spec.embedding_scale is not None else shape.embedding_scale)
            return Support(model_type, arch, SUPPORTED, prof.name, shape)
    if model_type in overrides:
        o = overrides[model_type]
        return Support(model_type, arch, o["status"], o["reason"], shape)
    if cfg is not None and cfg.to_dict().get("is_encoder_decoder"):
        return Support(model_type, arch, REFUSED, "not decoder-only: an encoder-decoder model", shape)
    if facts is not None and facts.absolute_positions:
        return Support(model_type, arch, REFUSED, "absolute position embeddings are added before layer 0, so its "
                       "input depends on the position, not on the token id alone", shape)
    missing, special = _shapes(cfg, facts)
    if _composite(cfg):
        missing.append("a composite (multimodal) config: the language model's sizes sit under text_config, and a "
                       "profile's sizes name top-level config.json keys")
    if missing:
        return Support(model_type, arch, NOT_YET, "; ".join(missing), shape)
    if facts is None or not facts.found:
        return Support(model_type, arch, "unclassified", "the source signals do not decide; add an entry to "
                       f"configs/{OVERRIDES_FILE}", shape)
    known = f"; the schema expresses its {', '.join(special)}" if special else ""
    return Support(model_type, arch, NOT_YET, f"no shipped profile (layer 0 uses known parts{known}: a YAML profile "
                   "should do)", shape)


def registry() -> dict[str, str]:
    """transformers' causal-LM registry: model type -> architecture class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return {t: a if isinstance(a, str) else a[0] for t, a in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}


def support_matrix() -> list[Support]:
    """Every model type of the installed transformers' causal-LM registry, classified, by model type."""
    from transformers.utils import logging as hf_logging

    shipped, refused, overrides = builtin_profiles(), refusals(), _overrides()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # default configs warn about their own token ids; they are not the user's
    try:
        return [classify(t, a, shipped, refused, overrides) for t, a in sorted(registry().items())]
    finally:
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------- output


def _shape_text(s: Layer0Shape) -> str:
    parts = [f"{s.norm} norm" if s.norm not in ("?", "none") else "no norm" if s.norm == "none" else "norm ?",
             f"{s.projections} q/k/v" if s.projections != "latent" else "latent q/kv"]
    if s.qk_norm != "-":
        parts.append(f"q/k norm {s.qk_norm}")
    if s.embedding_scale != "-":
        parts.append(f"embedding scaled {'by the module' if s.embedding_scale == 'module' else s.embedding_scale}")
    if s.mixer not in ATTENTION_LAYERS:
        parts.insert(0, f"{s.mixer} mixer")
    return ", ".join(parts)


def to_markdown(rows: list[Support]) -> str:
    """docs/support.md: one row per model type, generated (never edited by hand)."""
    import transformers

    c = counts(rows)
    lines = [
        "# Support matrix",
        "",
        (f"Generated from transformers {transformers.__version__}'s causal-LM registry by "
         "`python -m precompile.profiles.support --write docs/support.md`; do not edit by hand "
         "(`tests/profiles/test_support.py` fails when this file is stale). `precompile profiles` prints the same."),
        "",
        f"{len(rows)} model types: {c[SUPPORTED]} supported, {c[REFUSED]} refused, {c[NOT_YET]} not yet.",
        "",
        ("- **supported**: a shipped profile (configs/) is chosen for the type and resolves against its config "
         "defaults; every supported type is converted and compared with transformers by the tests."),
        "- **refused**: the trick cannot apply (configs/_refused.yaml, or the facts below).",
        "- **not yet**: what the profile schema lacks for this layer 0, or that no profile ships yet.",
        "",
        ("Block: serial or parallel (the FFN reads the same normed input as the attention). Layer 0: the norm "
         "before the sequence mixer, how q/k/v are projected, q/k norms, the embedding scale. Read from the "
         "config class's defaults and the modeling source; `?` where the source does not tell."),
        "",
        "| model type | architecture | block | layer 0 | status | profile or reason |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        reason = r.detail.replace("|", "\\|")
        lines.append(f"| {r.model_type} | {r.architecture} | {r.shape.block} | {_shape_text(r.shape)} | "
                     f"{r.status} | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m precompile.profiles.support [--write FILE | --check FILE] [--data FILE]`: print, write or check the
    matrix (docs/support.md) and the classification `precompile profiles` reads (--data)."""
    import argparse

    import transformers

    ap = argparse.ArgumentParser(prog="python -m precompile.profiles.support", description=main.__doc__)
    ap.add_argument("--write", metavar="FILE", help="write the Markdown matrix (docs/support.md) and --data")
    ap.add_argument("--check", metavar="FILE", help="exit 1 when FILE or --data differs from what would be written")
    ap.add_argument("--data", metavar="FILE", help=f"the JSON classification (default: configs/{MATRIX_FILE})")
    args = ap.parse_args(argv)
    rows = support_matrix()
    if not (args.write or args.check):
        print(to_text(rows))
        return 0
    outputs = {Path(f): text for f, text in ((args.write or args.check, to_markdown(rows)),
                                             (args.data or configs_dir() / MATRIX_FILE,
                                              to_json(rows, transformers.__version__)))}
    if args.check:
        stale = [str(p) for p, text in outputs.items() if not (p.is_file() and p.read_text(encoding="utf-8") == text)]
        print(f"{', '.join(stale)} stale: run python -m precompile.profiles.support --write {args.check}" if stale
              else f"{', '.join(map(str, outputs))} up to date")
        return 1 if stale else 0
    for p, text in outputs.items():
        p.write_text(text, encoding="utf-8")
    c = counts(rows)
    print(f"wrote {', '.join(map(str, outputs))}: {len(rows)} model types, "
          + ", ".join(f"{v} {k}" for k, v in c.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
