"""Property tests: the profile loader fails only with a named UserError, and the table layout adds up."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny
from conftest import ROOT
from precompile.errors import UserError
from precompile.plan.table_layout import projection_width, table_layout
from precompile.profiles.model_spec import ModelSpec
from precompile.profiles.profile_resolution import Profile, resolve, validate_profile

PROFILE_FILES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("_"))
PROFILES = {p.stem: yaml.safe_load(p.read_text()) for p in PROFILE_FILES}
# the tiny families whose config resolves against the profile of the same name
FAMILY_OF = {"llama": "llama", "mistral": "mistral", "mixtral": "mixtral", "qwen2": "qwen2", "gemma": "gemma"}
WORDS = ["rms", "layer", "glu", "mlp", "serial", "parallel", "q", "k", "v", "qkv", "silu", "gelu", "swishy",
         "hidden_size", "keys", "default", "weight", "bias", "eps", "config", "sqrt", "when", "set", "kind"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 5000), st.floats(allow_nan=True),
                    st.sampled_from(WORDS), st.text(max_size=6))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(WORDS), inner, max_size=3)),
                      max_leaves=6)


def node_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from node_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from node_paths(v, prefix + (i,))


def mutate(root: dict, data) -> dict:
    """One random edit anywhere in the tree: delete, replace, add an unknown key, or retype."""
    paths = list(node_paths(root))
    path = data.draw(st.sampled_from(paths))
    op = data.draw(st.sampled_from(["delete", "replace", "add", "retype"]))
    if not path:
        return data.draw(values) if op in ("replace", "retype") else root
    parent = root
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = data.draw(values)
    elif op == "add" and isinstance(parent[last], dict):
        parent[last][data.draw(st.sampled_from(WORDS + ["zzz"]))] = data.draw(values)
    else:
        parent[last] = data.draw(st.sampled_from([str(parent[last]), [parent[last]], {"x": parent[last]}, 0, None]))
    return root


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_shipped_profiles_are_valid(name):
    validate_profile(PROFILES[name], f"{name}.yaml")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_profile_mutations_fail_only_with_named_user_error(data):
    """validate_profile, then resolve against a matching config, raise nothing but a one-line UserError
    that names the file and a key; whatever passes them resolves to sane sizes."""
    name = data.draw(st.sampled_from(sorted(FAMILY_OF)))
    prof = copy.deepcopy(PROFILES[name])
    for _ in range(data.draw(st.integers(1, 3))):
        prof = mutate(prof, data)
    path = f"/profiles/{name}-mutated.yaml"
    try:
        validate_profile(prof, path)
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg and path in msg, msg
        assert re.search(r"key '[^']*'", msg), msg
        return
    config = tiny.make_config(FAMILY_OF[name]).to_dict()
    try:
        spec = resolve(Profile(str(prof.get("name")), path, prof), config)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert spec.hidden_size > 0 and spec.vocab_size > 0 and spec.head_dim > 0


# ---------------------------------------------------------------- table layout arithmetic


def _names(spec: ModelSpec) -> list[str]:
    """Every tensor name the spec refers to for layer 0 (all may be present in a checkpoint)."""
    out = [spec.embedding_tensor]
    for norm in (spec.embedding_norm, spec.attn_norm, spec.ffn.norm if spec.ffn else None):
        if norm is not None:
            out += [n for n in (norm.weight, norm.bias) if n]
    for p in spec.projections:
        out += [n for n in (p.weight, p.bias) if n]
    if spec.ffn is not None:
        for ref in (spec.ffn.up, spec.ffn.gate, spec.ffn.down):
            if ref is not None:
                out += [n for n in ref if n]
    return out


@st.composite
def specs(draw):
    family = draw(st.sampled_from(sorted(FAMILY_OF)))
    kv = draw(st.integers(1, 8))
    heads = kv * draw(st.integers(1, 8))
    head_dim = draw(st.integers(1, 64))
    hidden = draw(st.one_of(st.just(heads * head_dim), st.integers(1, 1024)))
    config = tiny.make_config(FAMILY_OF[family]).to_dict()
    config.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                  vocab_size=draw(st.integers(1, 300_000)), tie_word_embeddings=draw(st.booleans()))
    prof = Profile(family, f"{family}.yaml", PROFILES[family])
    spec = resolve(prof, config, assume_parallel=draw(st.booleans()))
    names = _names(spec)
    dropped = draw(st.sets(st.sampled_from(names))) if draw(st.booleans()) else set()
    return spec, frozenset(names) - dropped, (heads, kv, head_dim, hidden)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_table_layout_arithmetic(case):
    spec, present, (heads, kv, head_dim, hidden) = case
    lay = table_layout(spec, present)
    cols = lay.columns
    # contiguous from 0, widths from the real head sizes, nothing else in the row
    assert cols[0].start == 0
    assert all(a.stop == b.start for a, b in zip(cols, cols[1:]))
    assert all(c.stop > c.start for c in cols)
    assert lay.width == (hidden if lay.x_in_table else 0) + heads * head_dim + 2 * kv * head_dim
    for c in cols:
        if c.name in ("q", "k", "v", "qkv"):
            assert c.stop - c.start == projection_width(spec, c.name) == \
                {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim,
                 "qkv": (heads + 2 * kv) * head_dim}[c.name]
            assert c.module
        else:
            assert c.name == ("x+ffn" if spec.folds_ffn else "x") and c.stop - c.start == hidden
    # x leaves the table only when the loader can recompute it exactly from the embedding kept for the tied head:
    # the row itself, or the row times the embedding module's scale (no embedding norm, no folded FFN)
    assert lay.keep_embedding == spec.tied
    assert lay.x_in_table == (not spec.tied or spec.embedding_norm is not None or spec.block != "serial")
    assert lay.x_scale == (None if lay.x_in_table else spec.embedding_scale)
    # eliminated: present, unique, and exactly what the table makes unnecessary
    elim = set(lay.eliminated)
    assert len(elim) == len(lay.eliminated) and elim <= present
    assert (spec.embedding_tensor in elim) == (not spec.tied and spec.embedding_tensor in present)
    for p in spec.projections:
        assert (p.weight in elim) == (p.weight in present)
        if p.bias:
            assert (p.bias in elim) == (p.bias in present)
    for n in (spec.attn_norm.weight, spec.attn_norm.bias):
        if n:
            assert (n in elim) == (n in present)
    ffn_names = set()
    if spec.ffn is not None:
        for ref in (spec.ffn.up, spec.ffn.gate, spec.ffn.down):
            ffn_names |= {n for n in (ref or ()) if n}
        if spec.ffn.norm is not None:
            ffn_names |= {n for n in (spec.ffn.norm.weight, spec.ffn.norm.bias) if n}
    if spec.folds_ffn:
        assert ffn_names & present <= elim
    else:
        assert not (ffn_names & elim)


# ---------------------------------------------------------------- safetensors headers


@pytest.fixture(scope="module")
def shard(checkpoint) -> Path:
    import json

    src = checkpoint("llama")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_header_mutations_fail_only_with_user_error(shard, tmp_path_factory, data):
    """read_header is at least as strict as safetensors: it refuses with a UserError naming the file,
    or the file really is readable, tensor by tensor."""
    import json
    import struct

    from safetensors import safe_open

    from precompile.io.safetensors_files import read_header

    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    for _ in range(data.draw(st.integers(1, 2))):
        header = mutate(header, data)
    if data.draw(st.booleans()):
        body = body[: data.draw(st.integers(0, len(body)))] + data.draw(st.binary(max_size=16))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path_factory.mktemp("hdr") / "model-00001-of-00002.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    try:
        infos, _ = read_header(path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    with safe_open(path, framework="pt") as f:
        for name, info in infos.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == info.shape
