"""Architecture profiles: YAML data that says where layer 0's parts live.

A profile names the tensors as stored on disk, the module paths the loader
swaps, and the config.json keys that give the sizes. Architecture quirks live
here as data so that adding a family needs a YAML file and no code. Variants of
one family (e.g. GPT-NeoX with and without a parallel residual) are expressed as
`variants:` patches applied when config.json matches.

What a profile may say is defined once, in `precompile.profiles.sections`: this module validates and parses
profiles with it and resolves the parsed definition against config.json into a `ModelSpec`.
`python -m precompile.profiles --write-key-table` regenerates configs/README.md's key table from it.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from precompile.errors import UserError
from precompile.io.file_safety import check_regular
from precompile.profiles.sections import (
    ACTIVATIONS, EXPERT, HEAD, ConfigValue, DenseLayersDef, FfnDef, FlagValue, NormDef, ProfileDef, ProjectionDef,
    TensorRef, config_get)
from precompile.profiles.shipped import configs_dir as _configs_dir
from precompile.profiles.yaml_schema import is_number, key_table, parse

if TYPE_CHECKING:  # the loader imports torch; profiles are read without it
    from precompile.loader import Manifest


@dataclass(frozen=True)
class Norm:
    """A norm over the hidden size. `weight`/`bias` are tensor names (None: absent)."""

    kind: str
    weight: str | None
    bias: str | None
    eps: float
    offset: float
    module: str | None


@dataclass(frozen=True)
class LowRank:
    """A projection in front of another, with a norm between (MLA's q_a_proj -> q_a_layernorm -> q_b_proj)."""

    weight: str
    bias: str | None
    module: str
    rank: int
    norm: Norm | None


@dataclass(frozen=True)
class Projection:
    """A layer-0 projection whose output goes into the table."""

    role: str
    weight: str
    bias: str | None
    bias_required: bool
    module: str
    heads_interleaved: bool = False
    width: int | None = None  # the output width of a role without heads (WIDTH_ROLES)
    low_rank: LowRank | None = None  # the projection reads low_rank.norm(low_rank(h)) instead of h
    out_norm: Norm | None = None  # a norm over the first out_norm_width outputs (MLA's kv latent; the rest passes)
    out_norm_width: int = 0
    zero_masked: bool = False  # the mixer zeroes padded positions' input: their looked-up output is zero too

    @property
    def identity_modules(self) -> tuple[str, ...]:
        """The low-rank projection, its norm and the output norm: identities once the projection is looked up."""
        lr = self.low_rank
        mods = (lr.module, lr.norm.module if lr.norm else None) if lr else ()
        return tuple(m for m in (*mods, self.out_norm.module if self.out_norm else None) if m)

    @property
    def extra_norms(self) -> tuple[Norm, ...]:
        """The norms inside the projection: the low-rank one and the output one."""
        return tuple(n for n in (self.low_rank.norm if self.low_rank else None, self.out_norm) if n)


@dataclass(frozen=True)
class Expert:
    """One dense FFN: `mlp` is down(act(up(h))), `glu` is down(act(gate(h)) * up(h))."""

    kind: str
    up: tuple[str, str | None]
    gate: tuple[str, str | None] | None
    down: tuple[str, str | None]

    def refs(self) -> list[tuple[str, str | None]]:
        return [r for r in (self.gate, self.up, self.down) if r is not None]


@dataclass(frozen=True)
class Ffn:
    """The layer-0 FFN of a parallel block, folded into the table's first column.

    A dense FFN is one expert. A mixture of experts (kind `moe`) adds a router whose softmax picks
    `top_k` experts per token (renormalised over the picked ones when `normalize_topk`).
    """

    kind: str
    activation: str
    norm: Norm | None  # None: shares the attention norm
    up: tuple[str, str | None]
    gate: tuple[str, str | None] | None
    down: tuple[str, str | None]
    module: str
    experts: tuple[Expert, ...] = field(default=())  # moe only
    router: tuple[str, str | None] | None = None
    top_k: int = 1
    normalize_topk: bool = True
    shared: Expert | None = None  # moe only: a dense expert every token takes besides the routed ones
    shared_combine: str = "sum"  # "sum": routed + shared; "average": (routed + shared) / 2

    def refs(self) -> list[tuple[str, str | None]]:
        """Every (weight, bias) tensor reference of the FFN, router first."""
        if self.kind == "moe":
            shared = self.shared.refs() if self.shared else []
            return [self.router, *(r for e in self.experts for r in e.refs()), *shared]
        return [r for r in (self.up, self.gate, self.down) if r is not None]


@dataclass(frozen=True)
class ModelSpec:
    """A profile resolved against one config.json: sizes and tensor names for layer 0."""

    profile: str
    block: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    n_layers: int
    intermediate_size: int | None
    n_experts: int
    ffn_kind: str
    tied: bool
    embedding_tensor: str
    embedding_module: str
    embedding_scale: float | None
    embedding_norm: Norm | None
    attn_norm: Norm | None  # None: the sequence mixer reads the residual stream itself (OLMo 2's post-norms)
    projections: tuple[Projection, ...]
    attention_module: str
    ffn: Ffn | None  # described for every block; folded into the table only for parallel ones
    identity_modules: tuple[str, ...] = field(default=())
    qk_norms: dict[str, Norm] = field(default_factory=dict)  # role ("q"/"k") -> norm after the projection
    qk_norm_span: str = "head"  # the q/k norms act over each head ("head") or the whole output ("projection")
    embedding_multiplier: float | None = None  # applied by the model's forward to the embedding module's output
    shared_intermediate_size: int | None = None  # a MoE FFN's shared expert width (plan's count)
    dense_layers: tuple[int, ...] = ()  # the layers of a mixture of experts whose FFN is dense (`dense_layers`)
    dense_intermediate_size: int | None = None  # their FFN's hidden width

    @property
    def layer0_experts(self) -> int:
        """Layer 0's experts: 1 where it is one of a mixture of experts' dense layers."""
        return 1 if 0 in self.dense_layers else self.n_experts

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def folds_ffn(self) -> bool:
        return self.block == "parallel"

    @property
    def attention_kind(self) -> str:
        return attention_kind(self.num_heads, self.num_kv_heads)

    def qk_norm_heads(self, role: str) -> int:
        """How many heads the q or k projection has (one per-head norm tensor each, when stored per head)."""
        return self.num_heads if role == "q" else self.num_kv_heads

    def qk_norm_tensors(self, role: str) -> list[str]:
        """The tensor names of a q/k norm, one per head where the profile names them with {h}."""
        norm = self.qk_norms[role]
        return [n for t in (norm.weight, norm.bias) if t for n in expand_heads(t, self.qk_norm_heads(role))]

    @property
    def x_is_scaled_row(self) -> bool:
        """True when the residual input is the stored embedding row times the module's `embedding.scale` (or the
        row itself): the loader can recompute it from a kept embedding exactly as the embedding module does."""
        return self.embedding_norm is None and self.block == "serial"


def expand_heads(name: str, heads: int) -> list[str]:
    """A tensor name, or one per head when it holds {h} (per-head norms stored as separate modules)."""
    return [name.replace(HEAD, str(h)) for h in range(heads)] if HEAD in name else [name]


def attention_kind(num_heads: int, num_kv_heads: int) -> str:
    """MHA, MQA or GQA from the head counts."""
    if num_kv_heads == num_heads:
        return "MHA"
    if num_kv_heads == 1:
        return "MQA"
    return "GQA"


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
    return _parsed(_read_text(path, what, flag), f"{what} {path}")


def _read_text(path: Path, what: str, flag: str) -> str:
    check_regular(path, f"{what} ")
    try:
        if path.stat().st_size > YAML_MAX_BYTES * 4:  # UTF-8: at most 4 bytes a character
            raise UserError(f"{what} {path} has {path.stat().st_size:,} bytes, too large to be a {what}; fix it")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found; pass an existing YAML file{flag}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read ({e}); pass a readable UTF-8 YAML file") from None


def _parsed(text: str, label: str, fix: str = "fix it") -> Any:
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


def load_profile(path: str | Path, validate: bool = True) -> Profile:
    """Read and validate one YAML profile (validate=False: read it only; see `select_profile`)."""
    path = Path(path)
    text = _read_text(path, "profile", " to --profile")
    data = _parsed(text, f"profile {path}")
    if validate:
        validate_profile(data, str(path))
    return Profile(name=data["name"], path=str(path), data=data, text=text)


def recorded_profile(manifest: Manifest, where: str) -> Profile | None:
    """The profile a conversion was made with, from its manifest (`where`); None for manifests without it."""
    rec = manifest.profile
    text = rec.text
    if text is None:
        return None
    label = f"{where} (the profile recorded from {rec.path})"
    data = _parsed(text, label, "the manifest is damaged, pass --profile or convert again")
    validate_profile(data, label)
    return Profile(name=data["name"], path=str(rec.path or where), data=data, text=text)


def conversion_profile(manifest: Manifest, config: dict, where: str, profile_path: str | Path | None = None) -> Profile:
    """The profile of an existing conversion: --profile, else the one its manifest records, else (older
    manifests) the shipped profile of the recorded name, else the one config.json selects."""
    if profile_path is not None:
        return load_profile(profile_path)
    recorded = recorded_profile(manifest, where)
    if recorded is not None:
        return recorded
    name = manifest.profile.name
    for p in builtin_profiles():
        if p.name == name:
            return p
    return select_profile(config)


def builtin_profiles(validate: bool = True, mentioning: Collection[str] = ()) -> list[Profile]:
    """The profiles shipped in configs/, sorted by name.

    Picking one needs neither all of them nor their parsed definitions, which were most of what `plan` on a
    config cost: validate=False only reads them (`select_profile` validates the one it picks; tests validate
    every shipped one), and `mentioning` keeps those whose YAML text contains one of these names (a
    profile whose match keys list a name contains it, so matching among them picks the same profile)."""
    paths = sorted(p for p in _configs_dir().glob("*.yaml") if not p.name.startswith("_"))
    if mentioning:
        paths = [p for p in paths if any(n in p.read_text(encoding="utf-8") for n in mentioning)]
    return [load_profile(p, validate) for p in paths]


def match_names(config: dict) -> list[str]:
    """config.json's names that select a shipped profile: its architectures, then its model_type."""
    return [n for n in [*(config.get("architectures") or []), config.get("model_type")] if isinstance(n, str)]


def match_keys(profile: Profile, key: str) -> tuple[str, ...]:
    """A profile's `match.architectures` or `match.model_types` as its YAML lists them, read without parsing
    the profile (the same names the parsed Match holds, for a valid one)."""
    match = profile.data.get("match") if isinstance(profile.data, dict) else None
    names = match.get(key) if isinstance(match, dict) else None
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else ()


def refusals() -> dict[str, str]:
    """model_type -> why the trick does not apply to it (configs/_refused.yaml)."""
    data = read_yaml(_configs_dir() / "_refused.yaml", "refusal list")
    out = {}
    for entry in data["refused"]:
        for mt in entry["model_types"]:
            out[mt] = entry["reason"]
    return out


def select_profile(config: dict, profile_path: str | Path | Profile | None = None,
                   shipped: list[Profile] | None = None) -> Profile:
    """Pick the profile for a config.json: an explicit file (or an already loaded Profile, e.g. one recorded
    in a manifest), else by architectures, then model_type.

    `shipped`: builtin_profiles() when the caller has already read them.
    """
    if isinstance(profile_path, Profile):
        return profile_path
    if profile_path is not None:
        return load_profile(profile_path)
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    reason = refusals().get(model_type or "")
    if reason:
        raise UserError(f"model type '{model_type}' cannot be precompiled: {reason}")
    profiles = builtin_profiles(validate=False, mentioning=match_names(config)) if shipped is None else shipped
    chosen = next((p for arch in archs for p in profiles if arch in match_keys(p, "architectures")), None) or \
        next((p for p in profiles if model_type in match_keys(p, "model_types")), None)
    if chosen is not None:
        if shipped is None:  # read unvalidated above
            validate_profile(chosen.data, chosen.path)
        return chosen
    known = ", ".join(sorted({a for p in (shipped or builtin_profiles(validate=False))
                              for a in match_keys(p, "architectures")}))
    what = f"architecture {archs[0]}" if archs else f"model type '{model_type}'"
    raise UserError(f"no profile for {what}; supported: {known}. "
                    f"Write one (configs/README.md) and pass it with --profile")


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


def write_key_table(readme: Path) -> bool:
    """Rewrite the generated key table between the markers in configs/README.md; True when it changed."""
    text = readme.read_text(encoding="utf-8")
    begin, end = KEY_TABLE_MARKERS
    if begin not in text or end not in text:
        raise UserError(f"{readme} lacks the markers {begin} ... {end}; put them where the key table belongs")
    head, rest = text.split(begin, 1)
    new = f"{head}{begin}\n{key_table(ProfileDef)}{end}{rest.split(end, 1)[1]}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


KEY_TABLE_MARKERS = ("<!-- key table: generated by `python -m precompile.profiles --write-key-table` -->",
                     "<!-- end of key table -->")


def main(argv: list[str]) -> int:
    """`python -m precompile.profiles --write-key-table [README]` (default: configs/README.md)."""
    if not argv or argv[0] != "--write-key-table" or len(argv) > 2:
        print("usage: python -m precompile.profiles --write-key-table [configs/README.md]", file=sys.stderr)
        return 2
    readme = Path(argv[1]) if len(argv) > 1 else _configs_dir() / "README.md"
    print(f"{readme}: {'rewritten' if write_key_table(readme) else 'up to date'}")
    return 0


