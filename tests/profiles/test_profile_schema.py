"""The profile schema is written once: every section refuses unknown keys, wrong types and missing required
keys by name; configs/README.md's key table is generated from it and lists every key; parsed profiles
write back to YAML data that parses to the same definition."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import types
import typing
from dataclasses import fields, is_dataclass

import pytest
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from precompile.errors import UserError
from precompile.profiles.catalog import KEY_TABLE_MARKERS, builtin_profiles, write_key_table
from precompile.profiles.profile_resolution import validate_profile
from precompile.profiles.sections import ProfileDef
from precompile.profiles.yaml_schema import (
    dump, hints, is_required, key_meta, key_table, parse, section_title, sections)

# A profile that uses every section of the schema at least once (latent-attention projections with a low-rank
# input and an output norm, a MoE parallel block with a shared expert, q/k norms, an embedding scale and norm, a
# variant and a refusal); test_every_section_is_exercised keeps
# it complete as the schema grows.
FULL = yaml.safe_load("""
name: full
description: every section
match: {architectures: [FullForCausalLM], model_types: [full]}
defaults: {use_bias: false}
block: parallel
sizes:
  hidden_size: [hidden_size]
  num_heads: {keys: [num_attention_heads], default: 4}
  vocab_size: [vocab_size]
  n_layers: 2
  num_kv_heads: [num_key_value_heads]
tie_word_embeddings: {keys: [tie_word_embeddings], default: true}
embedding:
  tensor: model.embed.weight
  module: model.embed
  scale: {sqrt: hidden_size}
  norm: {kind: layer, weight: model.embed_norm.weight, bias: model.embed_norm.bias, eps: 1.0e-5,
         module: model.embed_norm}
attn_norm: {kind: rms, weight: model.layers.0.ln.weight, eps: [rms_norm_eps], offset: 1.0,
            module: model.layers.0.ln}
projections:
  - role: mla_q
    weight: model.layers.0.attn.q_b.weight
    module: model.layers.0.attn.q_b
    bias: model.layers.0.attn.q_b.bias
    bias_when: use_bias
    heads_interleaved: false
    width: ["num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim)"]
    low_rank: {weight: model.layers.0.attn.q_a.weight, bias: model.layers.0.attn.q_a.bias,
               module: model.layers.0.attn.q_a, rank: [q_lora_rank],
               norm: {kind: rms, weight: model.layers.0.attn.q_a_norm.weight, eps: 1.0e-6}}
  - role: mla_kv
    weight: model.layers.0.attn.kv_a.weight
    module: model.layers.0.attn.kv_a
    width: ["kv_lora_rank + qk_rope_head_dim"]
    zero_masked: false
    out_norm: {kind: rms, weight: model.layers.0.attn.kv_a_norm.weight, eps: 1.0e-6, width: [kv_lora_rank]}
qk_norm:
  over: head
  q: {kind: rms, weight: model.layers.0.attn.q_norm.weight, eps: [rms_norm_eps]}
  k: {kind: rms, weight: model.layers.0.attn.k_norm.weight, eps: [rms_norm_eps]}
attention_module: model.layers.0.attn
ffn:
  kind: moe
  activation: {config: hidden_act, default: silu}
  norm: shared
  router: {weight: model.layers.0.moe.router.weight, bias: model.layers.0.moe.router.bias}
  experts: [num_experts]
  top_k: [num_experts_per_tok]
  expert_kind: glu
  normalize_topk: {config: norm_topk_prob, default: true}
  up: model.layers.0.moe.experts.{e}.up.weight
  gate: model.layers.0.moe.experts.{e}.gate.weight
  down: model.layers.0.moe.experts.{e}.down.weight
  shared: {up: model.layers.0.moe.shared.up.weight, gate: model.layers.0.moe.shared.gate.weight,
           down: model.layers.0.moe.shared.down.weight, combine: average}
  module: model.layers.0.moe
dense_layers: {first: [first_k_dense_replace], indices: [mlp_only_layers], types: [mlp_layer_types],
               dense_type: dense, sparse_step: [decoder_sparse_step], intermediate_size: [intermediate_size]}
variants:
  - when: {scale_embedding: false}
    set: {embedding: {scale: null, multiplier: {config: embedding_multiplier}}, block: serial}
refuse:
  - {when: {use_alibi: true}, reason: absolute positions}
""")
PATH = "/profiles/full.yaml"


def _fail(key: str, problem: str) -> UserError:
    return UserError(f"key '{key}' {problem}")


def _section_dicts(obj, data, where=""):
    """(section class, key path, the mapping it was parsed from) for every section in a parsed profile."""
    if isinstance(obj, tuple):
        for i, (o, d) in enumerate(zip(obj, data)):
            yield from _section_dicts(o, d, f"{where}[{i}]")
    elif is_dataclass(obj) and not hasattr(obj, "from_yaml") and isinstance(data, dict):
        yield type(obj), where, data
        for f in fields(obj):
            if f.name in data:
                yield from _section_dicts(getattr(obj, f.name), data[f.name], f"{where}.{f.name}" if where else f.name)


CASES = list(_section_dicts(validate_profile(FULL, PATH), FULL))


def _refused(data: dict, key: str, *words: str) -> None:
    with pytest.raises(UserError) as e:
        validate_profile(data, PATH)
    msg = str(e.value)
    assert PATH in msg and f"key '{key}" in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def _at(data: dict, path: str) -> dict:
    for step in re.findall(r"[^.\[\]]+", path):
        data = data[int(step) if step.isdigit() else step]
    return data


def test_every_section_is_exercised():
    """FULL holds every section class of the schema, so the tests below cover each one."""
    assert {cls for cls, _, _ in CASES} == set(sections(ProfileDef))


@pytest.mark.parametrize("where", sorted({w for _, w, _ in CASES}))
def test_unknown_key_refused_in_every_section(where):
    data = copy.deepcopy(FULL)
    _at(data, where)["zzz"] = 1
    _refused(data, f"{where}.zzz" if where else "zzz", "not a known key", "known here:")


FIELDS = [(w, f.name) for cls, w, _ in CASES for f in fields(cls)]


@pytest.mark.parametrize("where,name", FIELDS)
def test_wrong_type_refused_for_every_key(where, name):
    """A list of lists is no key's type: every key, present or not, refuses it by its own path."""
    data = copy.deepcopy(FULL)
    _at(data, where)[name] = [[1]]
    _refused(data, f"{where}.{name}" if where else name)


REQUIRED = [(w, f.name) for cls, w, _ in CASES for f in fields(cls) if is_required(f)]


@pytest.mark.parametrize("where,name", REQUIRED)
def test_missing_required_key_refused(where, name):
    data = copy.deepcopy(FULL)
    del _at(data, where)[name]
    _refused(data, f"{where}.{name}" if where else name, "is missing")


def test_wrong_choice_names_the_allowed_values():
    data = copy.deepcopy(FULL)
    data["ffn"]["shared"]["combine"] = "max"
    _refused(data, "ffn.shared.combine", "'max'", "one of sum, average")


def test_variant_patch_mistake_names_the_variant():
    data = copy.deepcopy(FULL)
    data["variants"][0]["set"]["attn_norm"] = {"kind": "rms", "eps": 1e-6, "epsilon": 1}
    _refused(data, "variants[0].set.attn_norm.epsilon", "not a known key")


# ---------------------------------------------------------------- configs/README.md's key table


README = ROOT / "configs" / "README.md"


def _readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    begin, end = KEY_TABLE_MARKERS
    return text.split(begin, 1)[1].split(end, 1)[0].lstrip("\n")


def test_readme_key_table_is_current():
    assert _readme_block() == key_table(ProfileDef), \
        "configs/README.md's key table is stale: run python -m precompile.profiles --write-key-table"


def test_readme_key_table_lists_every_key_and_nothing_else():
    """Read back from the README: each section's table holds exactly the section's keys."""
    documented: dict[str, list[str]] = {}
    title = None
    for line in _readme_block().splitlines():
        if line.startswith("### "):
            title = line[4:]
        elif title and (m := re.match(r"\| `(\w+)` \|", line)):
            documented.setdefault(title, []).append(m.group(1))
    want = {section_title(cls): [f.name for f in fields(cls)] for cls in sections(ProfileDef)}
    assert documented == want


def test_write_key_table_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    begin, end = KEY_TABLE_MARKERS
    readme.write_text(f"# intro\n\n{begin}\nold table\n{end}\n\n## after\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "precompile.profiles", "--write-key-table", str(readme)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == 0 and "rewritten" in r.stdout, r.stdout + r.stderr
    assert readme.read_text() == f"# intro\n\n{begin}\n{key_table(ProfileDef)}{end}\n\n## after\n"
    assert not write_key_table(readme)  # up to date now
    readme.write_text("no markers\n")
    with pytest.raises(UserError, match="markers"):
        write_key_table(readme)


# ---------------------------------------------------------------- writing back


@pytest.mark.parametrize("name", [p.name for p in builtin_profiles()])
def test_shipped_profiles_round_trip(name):
    prof = next(p for p in builtin_profiles() if p.name == name)
    assert parse(ProfileDef, dump(prof.definition), _fail) == prof.definition


NAMES = st.text("abcdefgh_.", min_size=1, max_size=6)
SCALARS = st.one_of(st.booleans(), st.integers(-5, 5), NAMES, st.none())


def _yaml_value(tp, f):
    """YAML data of a field's type (not always valid: sections' cross-key rules may refuse it)."""
    alts = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    return st.one_of(*(_one(a, f) for a in alts))


def _one(tp, f):
    if hasattr(tp, "from_yaml"):
        literal = st.one_of(st.integers(1, 9), st.floats(0.5, 4.0), st.booleans())
        keys = st.lists(NAMES, min_size=1, max_size=3)
        return st.one_of(literal, keys, st.fixed_dictionaries({"keys": keys}, optional={"default": literal}))
    if is_dataclass(tp):
        return _section_yaml(tp)
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        return st.lists(NAMES if item is str else _section_yaml(item), max_size=3)
    if typing.get_origin(tp) is dict:
        return st.dictionaries(NAMES, SCALARS, max_size=3)
    if tp is str:
        return st.sampled_from(key_meta(f).choices) if key_meta(f).choices else NAMES
    return {bool: st.booleans(), float: st.one_of(st.integers(-3, 3), st.floats(-4, 4))}[tp]


def _section_yaml(cls):
    required = {f.name: st.deferred(lambda f=f: _yaml_value(hints(cls)[f.name], f)) for f in fields(cls)
                if is_required(f)}
    optional = {f.name: st.deferred(lambda f=f: _yaml_value(hints(cls)[f.name], f)) for f in fields(cls)
                if not is_required(f)}
    return st.fixed_dictionaries(required, optional=optional)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(st.data())
def test_parse_dump_parse_is_the_same_definition(data):
    """Any YAML data the schema accepts, in any section, parses to a definition that writes back to data
    parsing to the same definition."""
    cls = data.draw(st.sampled_from(sorted(sections(ProfileDef), key=lambda c: c.__name__)))
    raw = data.draw(_section_yaml(cls))
    try:
        first = parse(cls, raw, _fail)
    except UserError:
        assume(False)
    assert parse(cls, dump(first), _fail) == first

