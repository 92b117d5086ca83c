"""A profile as read, validated and resolved: `Profile` (the YAML of one file), its typed definition
(`precompile.profiles.sections`), its variants applied for a config.json, and `resolve`, which turns both into
the `ModelSpec` every later stage reads. A mistake is a UserError naming the file and the key.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from precompile.errors import UserError
from precompile.profiles.config_values import ConfigValue, FlagValue, config_get
from precompile.profiles.model_spec import Expert, Ffn, LowRank, ModelSpec, Norm, Projection
from precompile.profiles.sections import (
    ACTIVATIONS, DenseLayersDef, EXPERT, FfnDef, NormDef, ProfileDef, ProjectionDef, TensorRef)
from precompile.profiles.yaml_schema import is_number, parse


@dataclass(frozen=True)
class Profile:
    name: str
    path: str
    data: dict  # the YAML as parsed: variants patch it before it is parsed into a definition
    text: str = ""  # the YAML as written: recorded in a conversion's manifest

    @cached_property
    def definition(self) -> ProfileDef:
        """The typed profile (variants not applied); parsing it validates the data."""
        return parse_profile(self.data, self.path)

    @property
    def architectures(self) -> list[str]:
        return list(self.definition.match.architectures)

    @property
    def model_types(self) -> list[str]:
        return list(self.definition.match.model_types)

    @property
    def block(self) -> str:
        return self.definition.block


def _fail(path: str, key: str, problem: str) -> UserError:
    return UserError(f"profile {path}: key '{key}' {problem}; fix the YAML (see configs/README.md)")


def parse_profile(data: Any, path: str, where: str = "") -> ProfileDef:
    """A profile's data (variants not applied) as its typed definition; a mistake is a UserError naming `path`
    and the key (under `where`, e.g. the variant whose patch made the mistake)."""
    if not isinstance(data, dict):
        raise _fail(path, where, "(the whole file) must be a mapping of profile keys (name, match, block, sizes, "
                                 "embedding, projections, attention_module, ...)")
    return parse(ProfileDef, data, lambda key, problem: _fail(path, f"{where}.{key}" if where else key, problem))


def validate_profile(data: Any, path: str) -> ProfileDef:
    """Check a profile, and the profile each variant makes of it, so that mistakes are named by key and file,
    not by a KeyError later; returns the typed definition."""
    defn = parse_profile(data, path)
    for i, variant in enumerate(defn.variants):
        parse_profile(_apply_patch(data, variant.set), path, f"variants[{i}].set")
    return defn


def _apply_patch(base: dict, patch: dict) -> dict:
    """Deep-merge `patch` into a copy of `base`; a None value deletes the key."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _apply_patch(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _norm(norm: NormDef | None, config: dict, profile: Profile, where: str) -> Norm | None:
    if norm is None:
        return None
    eps = norm.eps.read(config)
    if eps is None:
        raise UserError(f"config.json has none of {list(norm.eps.keys)}, read by key '{where}.eps' of profile "
                        f"{profile.path}; add it to config.json, or name the key the model's config.json uses (or a "
                        f"number) in the profile")
    if not is_number(eps):
        raise UserError(f"{where}.eps of profile {profile.name} resolves to {eps!r}, not a number; fix config.json "
                        f"or the profile")
    return Norm(kind=norm.kind, weight=norm.weight, bias=norm.bias, eps=float(eps), offset=float(norm.offset),
                module=norm.module)


def _tensor_ref(ref: TensorRef) -> tuple[str, str | None]:
    return (ref, None) if isinstance(ref, str) else (ref.weight, ref.bias)


def with_defaults(profile: Profile, config: dict) -> dict:
    """config.json with the profile's `defaults` filled in where a key is absent or null.

    Hub configs often omit values that equal the transformers defaults (Falcon-40B has no
    `num_ln_in_parallel_attn`); the profile states them so that variants match as the model behaves.
    """
    out = dict(config)
    for k, v in profile.definition.defaults.items():
        if out.get(k) is None:
            out[k] = v
    return out


def _matches(when: dict, config: dict) -> bool:
    return all(config_get(config, k) == v for k, v in when.items())


def effective_data(profile: Profile, config: dict) -> dict:
    """The profile with every variant whose `when` matches config.json applied, in order."""
    config = with_defaults(profile, config)
    data = profile.data
    for variant in profile.definition.variants:
        if _matches(variant.when, config):
            data = _apply_patch(data, variant.set)
    return data


def effective_definition(profile: Profile, config: dict) -> ProfileDef:
    """The typed profile for this config.json: its matching variants applied."""
    data = effective_data(profile, config)
    return profile.definition if data is profile.data else parse_profile(data, profile.path)


def _activation(act: Any, config: dict) -> str:
    """An activation name, or {config, default} read from config.json, in the profile's vocabulary."""
    if not isinstance(act, str):
        act = config.get(act.config) or act.default
        if isinstance(act, str):
            act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                   "swish": "silu"}.get(act, act)
        if act not in ACTIVATIONS:
            raise UserError(f"activation '{act}' of config.json is not supported; "
                            f"supported: {', '.join(ACTIVATIONS)}")
    return act


def _ffn(f: FfnDef, config: dict, profile: Profile) -> Ffn:
    act = _activation(f.activation, config)
    fnorm = _norm(f.norm, config, profile, "ffn.norm") if isinstance(f.norm, NormDef) else None
    gate = _tensor_ref(f.gate) if f.gate else None
    up, down = _tensor_ref(f.up), _tensor_ref(f.down)
    if f.kind != "moe":
        return Ffn(kind=f.kind, activation=act, norm=fnorm, up=up, gate=gate, down=down, module=f.module)
    raw = (f.experts.read(config), f.top_k.read(config))
    n, top_k = (int(v) if _whole(v, MAX_MANY) else 0 for v in raw)
    if n < 1 or not 1 <= top_k <= n:
        raise UserError(f"config.json gives {raw[0]!r:.40} experts and top_k {raw[1]!r:.40} for profile "
                        f"{profile.name}; need 1 to {MAX_MANY:,} experts and 1 <= top_k <= experts")
    norm_topk = f.normalize_topk
    if not isinstance(norm_topk, bool):
        norm_topk = config.get(norm_topk.config, norm_topk.default)

    def expand(ref: tuple[str, str | None] | None, e: int) -> tuple[str, str | None] | None:
        return None if ref is None else (ref[0].replace(EXPERT, str(e)), ref[1] and ref[1].replace(EXPERT, str(e)))

    experts = tuple(Expert(kind=f.expert_kind, up=expand(up, e), gate=expand(gate, e), down=expand(down, e))
                    for e in range(n))
    sh = f.shared
    shared = None if not sh else Expert(kind=f.expert_kind, up=_tensor_ref(sh.up), down=_tensor_ref(sh.down),
                                        gate=_tensor_ref(sh.gate) if sh.gate else None)
    return Ffn(kind="moe", activation=act, norm=fnorm, up=up, gate=gate, down=down, module=f.module,
               experts=experts, router=_tensor_ref(f.router), top_k=top_k, normalize_topk=bool(norm_topk),
               shared=shared, shared_combine=sh.combine if sh else "sum")


def _projection_extras(p: ProjectionDef, config: dict, profile: Profile, where: str, ref_count) -> dict[str, Any]:
    """A projection's width, low-rank input and output norm, resolved (the keys of `Projection` they set)."""
    out: dict[str, Any] = {"zero_masked": p.zero_masked}
    if p.width is not None:
        out["width"] = ref_count(p.width, f"{where}.width")
    lr = p.low_rank
    if lr:
        out["low_rank"] = LowRank(weight=lr.weight, bias=lr.bias, module=lr.module,
                                  rank=ref_count(lr.rank, f"{where}.low_rank.rank"),
                                  norm=_norm(lr.norm, config, profile, f"{where}.low_rank.norm"))
    if p.out_norm:
        out["out_norm"] = _norm(p.out_norm, config, profile, f"{where}.out_norm")
        out["out_norm_width"] = ref_count(p.out_norm.width, f"{where}.out_norm.width")
        if out["out_norm_width"] > out.get("width", out["out_norm_width"]):
            raise UserError(f"profile {profile.path}: {where}.out_norm.width ({out['out_norm_width']}) exceeds the "
                            f"projection's width ({out['width']}); fix the profile or config.json")
    return out


MAX_COUNT = 2**31 - 1  # a width or vocabulary size past this is no model's
MAX_MANY = 1 << 16  # heads, layers, experts: counts that become lists of names or modules


def _whole(val: Any, limit: int = MAX_COUNT) -> bool:
    """A positive whole number within `limit` (finite: `is_number`), as every size and count must be."""
    return is_number(val) and int(val) == val and 0 < val <= limit


def resolve(profile: Profile, config: dict, assume_parallel: bool = False) -> ModelSpec:
    """Resolve a profile against config.json into concrete sizes and names."""
    config = with_defaults(profile, config)
    for entry in profile.definition.refuse:
        if _matches(entry.when, config):
            what = ", ".join(f"{k}={json.dumps(v)}" for k, v in entry.when.items())
            raise UserError(f"{profile.name} with {what} cannot be precompiled: {entry.reason}")
    body = effective_definition(profile, config)
    sizes = body.sizes

    def size(name: str, required: bool = True) -> Any:
        spec = getattr(sizes, name)
        val = spec.read(config) if spec is not None else None
        if val is None and required:
            keys = spec.keys if spec is not None and spec.keys else (name,)
            raise UserError(f"config.json lacks {' or '.join(map(str, keys))}, read by key 'sizes.{name}' of profile "
                            f"{profile.path}; add it to config.json, or name the key the model's config.json uses in "
                            f"the profile")
        return val

    def count(name: str, required: bool = True) -> int | None:
        """A size that must be a positive whole number."""
        val = size(name, required)
        if val is None:
            return None
        limit = MAX_MANY if name in ("num_heads", "num_kv_heads", "n_layers", "n_experts") else MAX_COUNT
        if not _whole(val, limit):
            spec = getattr(sizes, name)
            key = next((k for k in (spec.keys if spec is not None else ()) if config.get(k) is not None), None)
            where = f"config.json gives {key}" if key else f"profile {profile.name} gives sizes.{name}"
            raise UserError(f"{where} = {val!r:.40} (the model's {name}); it must be a positive whole number up to "
                            f"{limit:,}")
        return int(val)

    def ref_count(spec: ConfigValue, where: str) -> int:
        """A config reference (not a sizes key) that must give a positive whole number."""
        val = spec.read(config)
        if not _whole(val):
            raise UserError(f"config.json gives {val!r} for key '{where}' of profile {profile.path} "
                            f"({spec.to_yaml()}); it must be a positive whole number: fix config.json or the profile")
        return int(val)

    d = count("hidden_size")
    heads = count("num_heads")
    multi_query = bool(size("multi_query", required=False))
    kv = count("num_kv_heads", required=False)
    kv = 1 if multi_query and kv is None else (kv if kv is not None else heads)
    head_dim = count("head_dim", required=False)
    head_dim = head_dim if head_dim is not None else d // heads
    if heads <= 0 or kv <= 0 or heads % kv or head_dim <= 0:
        raise UserError(f"config.json gives {heads} attention heads and {kv} key/value heads; "
                        f"the head count must be a positive multiple of the key/value head count")
    block = "parallel" if assume_parallel else body.block
    tie_spec = body.tie_word_embeddings or FlagValue(keys=("tie_word_embeddings",), default=False)
    tied = bool(tie_spec.read(config))
    emb = body.embedding
    size_names = {f.name for f in fields(sizes)}

    def factor(key: str) -> float | None:
        """embedding.scale or embedding.multiplier: sqrt of a size, a config value, or a number."""
        s = getattr(emb, key)
        if s is None:
            return None
        if s.sqrt is not None:
            base = count(s.sqrt) if s.sqrt in size_names and getattr(sizes, s.sqrt) is not None else \
                config_get(config, s.sqrt)
            if not is_number(base) or base <= 0:
                raise UserError(f"config.json gives {s.sqrt} = {base!r}, needed as a positive number for the "
                                f"embedding {key} of profile {profile.name}; fix config.json")
            return math.sqrt(float(base))
        if s.config is not None:
            val = config_get(config, s.config)
            val = 1.0 if val is None else val
            if not is_number(val):
                raise UserError(f"config.json gives {s.config} = {val!r}, needed as a number for the embedding "
                                f"{key} of profile {profile.name}; fix config.json")
            return float(val)
        return float(s.value)

    scale, multiplier = factor("scale"), factor("multiplier")
    if multiplier is not None and block == "parallel":
        raise UserError(f"profile {profile.name}: embedding.multiplier with a parallel block is not supported (the "
                        f"table's x + FFN would have to be divided by it); drop one of them")
    ffn = _ffn(body.ffn, config, profile) if body.ffn else None
    projections = []
    for i, p in enumerate(body.projections):
        when = p.bias_when
        required = bool(config.get(when, False)) if isinstance(when, str) else bool(when)
        projections.append(Projection(role=p.role, weight=p.weight, bias=p.bias,
                                      bias_required=required and p.bias is not None,
                                      module=p.module, heads_interleaved=p.heads_interleaved,
                                      **_projection_extras(p, config, profile, f"projections[{i}]", ref_count)))
    qk = body.qk_norm
    span = qk.over if qk else "head"
    qk_norms = {role: _norm(getattr(qk, role), config, profile, f"qk_norm.{role}")
                for role in ("q", "k") if qk and getattr(qk, role) is not None}
    if qk_norms and any(p.role == "qkv" and p.heads_interleaved for p in projections) and (
            heads != kv or span != "head"):
        raise UserError(f"profile {profile.name}: qk_norm on a heads_interleaved qkv needs as many key/value heads as "
                        f"heads and per-head norms; fix the YAML or config.json")
    attn_norm = _norm(body.attn_norm, config, profile, "attn_norm")
    emb_norm = _norm(emb.norm, config, profile, "embedding.norm")
    identity = [m for m in (emb_norm.module if emb_norm else None, attn_norm.module if attn_norm else None) if m]
    if block == "parallel" and ffn is not None and ffn.norm is not None and ffn.norm.module:
        identity.append(ffn.norm.module)
    identity += [n.module for n in qk_norms.values() if n.module]
    identity += [m for p in projections for m in p.identity_modules]
    inter = size("intermediate_size", required=False)
    n_exp = size("n_experts", required=False)
    n_layers = count("n_layers")
    dense = _dense_layers(body.dense_layers, config, n_layers, profile, ref_count)
    if 0 in dense and ffn is not None and ffn.experts:
        raise UserError(f"profile {profile.name} describes layer 0's FFN as a mixture of experts, but config.json "
                        f"makes layer 0 dense (dense_layers); this config needs a profile whose ffn is dense")
    dense_inter = (ref_count(body.dense_layers.intermediate_size, "dense_layers.intermediate_size")
                   if dense and body.dense_layers.intermediate_size is not None else
                   count("intermediate_size", required=False) if dense and inter is not None else None)
    return ModelSpec(
        profile=profile.name, block=block, hidden_size=d, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        vocab_size=count("vocab_size"), n_layers=n_layers,
        intermediate_size=count("intermediate_size", required=False) if inter is not None else None,
        n_experts=len(ffn.experts) if ffn is not None and ffn.experts else (
            count("n_experts", required=False) if n_exp else 1), ffn_kind=body.ffn.kind if body.ffn else "glu",
        tied=tied, embedding_tensor=emb.tensor, embedding_module=emb.module, embedding_scale=scale,
        embedding_norm=emb_norm, attn_norm=attn_norm,
        projections=tuple(projections), attention_module=body.attention_module, ffn=ffn,
        identity_modules=tuple(identity), qk_norms=qk_norms, qk_norm_span=span,
        embedding_multiplier=multiplier, shared_intermediate_size=(
            count("shared_intermediate_size") if size("shared_intermediate_size", required=False) else None),
        dense_layers=dense, dense_intermediate_size=dense_inter,
    )


def _dense_layers(d: DenseLayersDef | None, config: dict, n_layers: int, profile: Profile,
                  ref_count) -> tuple[int, ...]:
    """The indices of the dense layers `dense_layers` names for this config (() without the key)."""
    if d is None:
        return ()

    def whole(spec: ConfigValue, where: str) -> int | None:
        val = spec.read(config)
        if val is None:
            return None
        if isinstance(val, bool) or not is_number(val) or int(val) != val or val < 0:
            raise UserError(f"config.json gives {val!r} for key 'dense_layers.{where}' of profile {profile.path} "
                            f"({spec.to_yaml()}); it must be a whole number >= 0: fix config.json or the profile")
        return int(val)

    def listed(spec: ConfigValue, where: str, ok) -> list:
        val = spec.read(config)
        if val is None:
            return []
        if not isinstance(val, list) or not all(ok(v) for v in val):
            raise UserError(f"config.json gives {str(val)[:80]} for key 'dense_layers.{where}' of profile "
                            f"{profile.path} ({spec.to_yaml()}); it must be a list: fix config.json or the profile")
        return val

    first = whole(d.first, "first") if d.first is not None else None
    indices = set(listed(d.indices, "indices", lambda v: isinstance(v, int) and not isinstance(v, bool))
                  if d.indices is not None else [])
    types = listed(d.types, "types", lambda v: isinstance(v, str)) if d.types is not None else []
    step = ref_count(d.sparse_step, "dense_layers.sparse_step") if d.sparse_step is not None and \
        d.sparse_step.read(config) is not None else None
    return tuple(i for i in range(n_layers)
                 if (first is not None and i < first) or i in indices or (i < len(types) and types[i] == d.dense_type)
                 or (step is not None and (i + 1) % step != 0))
