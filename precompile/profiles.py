"""Architecture profiles: YAML data that says where layer 0's parts live.

A profile names the tensors as stored on disk, the module paths the loader
swaps, and the config.json keys that give the sizes. Architecture quirks live
here as data so that adding a family needs a YAML file and no code. Variants of
one family (e.g. GPT-NeoX with and without a parallel residual) are expressed as
`variants:` patches applied when config.json matches.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import UserError
from .files import check_regular
from .shipped import configs_dir as _configs_dir

if TYPE_CHECKING:  # the loader imports torch; profiles are read without it
    from .loader import Manifest

NORM_KINDS = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")
FFN_KINDS = ("mlp", "glu", "moe")
EXPERT_KINDS = ("mlp", "glu")
PROJ_ROLES = ("q", "k", "v", "qkv", "mla_q", "mla_kv", "mixer_in")
# roles whose width is not given by the heads: the profile names it (`width`)
WIDTH_ROLES = ("mla_q", "mla_kv", "mixer_in")
# the sets of roles a layer 0 may project into: attention (separate or fused), latent attention (MLA: the query and
# the kv latent with its rotary key), or a sequence mixer other than attention (state-space, short convolution)
ROLE_SETS = (["k", "q", "v"], ["qkv"], ["mla_kv", "mla_q"], ["mixer_in"])
BLOCKS = ("serial", "parallel")

_TOP_KEYS = {
    "name", "description", "match", "block", "sizes", "tie_word_embeddings", "embedding",
    "attn_norm", "projections", "qk_norm", "attention_module", "ffn", "variants", "defaults",
    "refuse",
}
_REQUIRED_TOP = ("name", "match", "block", "sizes", "embedding", "projections", "attention_module")
QK_NORM_SPANS = ("head", "projection")
HEAD = "{h}"  # in a per-head norm's tensor names: one tensor per head (StableLM's q_layernorm.norms.{h})


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
    def x_is_stored_row(self) -> bool:
        """True when the residual input is exactly the stored embedding row."""
        return self.embedding_scale is None and self.embedding_norm is None and self.block == "serial"


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
    data: dict
    text: str = ""  # the YAML as written: recorded in a conversion's manifest

    @property
    def architectures(self) -> list[str]:
        return list(self.data["match"].get("architectures", []))

    @property
    def model_types(self) -> list[str]:
        return list(self.data["match"].get("model_types", []))

    @property
    def block(self) -> str:
        return self.data["block"]


def _fail(path: str, key: str, problem: str) -> UserError:
    return UserError(f"profile {path}: key '{key}' {problem}; fix the YAML (see configs/README.md)")


def _check_keys(obj: Any, allowed: set[str], required: tuple[str, ...], path: str, where: str) -> None:
    if not isinstance(obj, dict):
        raise _fail(path, where, "must be a mapping")
    for k in required:
        if k not in obj:
            raise _fail(path, f"{where}.{k}" if where else k, "is missing")
    for k in obj:
        if k not in allowed:
            raise _fail(path, f"{where}.{k}" if where else str(k),
                        f"is not a known key (known here: {', '.join(sorted(allowed))})")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_name(obj: Any, key: str, path: str, where: str, optional: bool = True) -> None:
    """A tensor or module name: a non-empty string (or absent / null when optional)."""
    v = obj.get(key)
    if v is None and optional:
        return
    if not isinstance(v, str) or not v:
        raise _fail(path, f"{where}.{key}" if where else key, "must be a tensor or module name (a string)")


def _check_config_ref(v: Any, path: str, where: str, value_ok) -> None:
    """A value taken from config.json: a list of keys, {keys, default}, or a literal accepted by value_ok."""
    if value_ok(v):
        return
    if isinstance(v, dict):
        _check_keys(v, {"keys", "default"}, ("keys",), path, where)
        if "default" in v and v["default"] is not None and not value_ok(v["default"]):
            raise _fail(path, f"{where}.default", "has the wrong type")
        v = v["keys"]
        where = f"{where}.keys"
    if not (isinstance(v, list) and v and all(isinstance(k, str) for k in v)):
        raise _fail(path, where, "must be a list of config.json keys, {keys, default}, or a value")
    for k in v:
        if is_expression(k):
            try:
                _parse_expression(k)
            except ValueError as e:
                raise _fail(path, where, f"holds '{k}', not an arithmetic expression over config keys ({e})") from None


_EXPR_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
             ast.Div: operator.truediv}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def is_expression(key: str) -> bool:
    """A config reference entry that is arithmetic over config keys (`4 * n_embd`), not a single key."""
    return any(c in key for c in "+-*/() ")


def _parse_expression(text: str) -> tuple[ast.expr, list[str]]:
    """The expression's tree (config keys renamed to _0, _1, ...) and the keys; ValueError when it is not
    + - * / // over numbers, parentheses and config keys (dotted keys read nested sections)."""
    keys: list[str] = []

    def name(m: re.Match) -> str:
        keys.append(m.group(0))
        return f"_{len(keys) - 1}"

    try:
        tree = ast.parse(_NAME.sub(name, text), mode="eval").body
    except SyntaxError:
        raise ValueError("it does not parse") from None
    for node in ast.walk(tree):
        if not isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.USub,
                                 *_EXPR_OPS)) or (isinstance(node, ast.Constant) and not _is_num(node.value)):
            raise ValueError(f"{type(node).__name__} is not allowed")
    return tree, keys


def expression_value(config: dict, text: str) -> float | int | None:
    """An arithmetic expression over config keys, or None when a key it names is absent or not a number."""
    tree, keys = _parse_expression(text)
    values = [config_get(config, k) for k in keys]
    if not all(_is_num(v) for v in values):
        return None

    def ev(node: ast.expr):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return values[int(node.id[1:])]
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand)
        return _EXPR_OPS[type(node.op)](ev(node.left), ev(node.right))

    try:
        return ev(tree)
    except ZeroDivisionError:
        return None


def _check_norm(obj: Any, path: str, where: str, per_head: bool = False) -> None:
    """A norm's keys; `per_head`: its tensor names may hold {h} (one tensor per head)."""
    _check_keys(obj, {"kind", "weight", "bias", "eps", "offset", "module"}, ("kind", "eps"), path, where)
    if obj["kind"] not in NORM_KINDS:
        raise _fail(path, f"{where}.kind", f"is '{obj['kind']}', expected one of {', '.join(NORM_KINDS)}")
    if not _is_num(obj.get("offset", 0)):
        raise _fail(path, f"{where}.offset", "must be a number")
    for key in ("weight", "bias", "module"):
        _check_name(obj, key, path, where)
    for key in ("weight", "bias"):
        if not per_head and HEAD in (obj.get(key) or ""):
            raise _fail(path, f"{where}.{key}", f"holds {HEAD}, which only a per-head q/k norm may use")
    _check_config_ref(obj["eps"], path, f"{where}.eps", _is_num)


def _check_projection_extras(p: dict, path: str, where: str) -> None:
    """A projection's width, low-rank input and output norm (latent attention, other sequence mixers)."""
    _check_config_ref(p.get("width", 1), path, f"{where}.width", _is_num)
    if (p["role"] in WIDTH_ROLES) != ("width" in p):
        raise _fail(path, f"{where}.width", f"is {'missing' if 'width' not in p else 'not allowed'} (role "
                                            f"{p['role']}: only {', '.join(WIDTH_ROLES)} name their output width)")
    if not isinstance(p.get("zero_masked", False), bool):
        raise _fail(path, f"{where}.zero_masked", "must be true or false")
    lr = p.get("low_rank")
    if lr is not None:
        _check_keys(lr, {"weight", "bias", "module", "rank", "norm"}, ("weight", "module", "rank"), path,
                    f"{where}.low_rank")
        for key in ("weight", "module"):
            _check_name(lr, key, path, f"{where}.low_rank", optional=False)
        _check_name(lr, "bias", path, f"{where}.low_rank")
        _check_config_ref(lr["rank"], path, f"{where}.low_rank.rank", _is_num)
        if lr.get("norm") is not None:
            _check_norm(lr["norm"], path, f"{where}.low_rank.norm")
    on = p.get("out_norm")
    if on is not None:
        if not isinstance(on, dict) or "width" not in on:
            raise _fail(path, f"{where}.out_norm.width", "is missing (how many leading outputs the norm covers)")
        _check_config_ref(on["width"], path, f"{where}.out_norm.width", _is_num)
        _check_norm({k: v for k, v in on.items() if k != "width"}, path, f"{where}.out_norm")


def _check_tensor_ref(obj: Any, path: str, where: str) -> None:
    if isinstance(obj, str) and obj:
        return
    _check_keys(obj, {"weight", "bias"}, ("weight",), path, where)
    _check_name(obj, "weight", path, where, optional=False)
    _check_name(obj, "bias", path, where)


def validate_profile(data: Any, path: str) -> None:
    """Check a profile's structure so that mistakes are named by key and file, not by a KeyError later."""
    if not isinstance(data, dict):
        raise _fail(path, "", f"(the whole file) must be a mapping of profile keys ({', '.join(_REQUIRED_TOP)}, ...)")
    _check_keys(data, _TOP_KEYS, _REQUIRED_TOP, path, "")
    if not isinstance(data["name"], str) or not data["name"]:
        raise _fail(path, "name", "must be a non-empty string")
    if not isinstance(data.get("description", ""), str):
        raise _fail(path, "description", "must be a string")
    _check_keys(data["match"], {"architectures", "model_types"}, (), path, "match")
    for k, v in data["match"].items():
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise _fail(path, f"match.{k}", "must be a list of names")
    if not (data["match"].get("architectures") or data["match"].get("model_types")):
        raise _fail(path, "match", "must list architectures or model_types")
    if not isinstance(data.get("defaults", {}), dict):
        raise _fail(path, "defaults", "must map config keys to the values used when config.json lacks them")
    for i, entry in enumerate(data.get("refuse") or []):
        _check_keys(entry, {"when", "reason"}, ("when", "reason"), path, f"refuse[{i}]")
        if not isinstance(entry["reason"], str):
            raise _fail(path, f"refuse[{i}].reason", "must be a string (shown to the user)")
        if not isinstance(entry["when"], dict):
            raise _fail(path, f"refuse[{i}].when", "must map config keys to values")
    _check_body(data, path)
    variants = data.get("variants") or []
    if not isinstance(variants, list):
        raise _fail(path, "variants", "must be a list of {when, set}")
    for i, variant in enumerate(variants):
        _check_keys(variant, {"when", "set"}, ("when", "set"), path, f"variants[{i}]")
        if not isinstance(variant["when"], dict):
            raise _fail(path, f"variants[{i}].when", "must map config keys to values")
        if not isinstance(variant["set"], dict):
            raise _fail(path, f"variants[{i}].set", "must be a mapping of profile keys")
        patched = _apply_patch(data, variant["set"])
        _check_keys(patched, _TOP_KEYS, _REQUIRED_TOP, path, f"variants[{i}].set")
        _check_body(patched, path)


def _check_body(data: dict, path: str) -> None:
    if data["block"] not in BLOCKS:
        raise _fail(path, "block", f"is '{data['block']}', expected serial or parallel")
    sizes = data["sizes"]
    _check_keys(sizes, {"hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "n_layers",
                        "intermediate_size", "n_experts", "multi_query", "shared_intermediate_size"},
                ("hidden_size", "num_heads", "vocab_size", "n_layers"), path, "sizes")
    for k, v in sizes.items():
        _check_config_ref(v, path, f"sizes.{k}", lambda x: _is_num(x) or isinstance(x, bool))
    tie = data.get("tie_word_embeddings")
    if tie is not None:
        _check_config_ref(tie, path, "tie_word_embeddings", lambda x: isinstance(x, bool))
    emb = data["embedding"]
    _check_keys(emb, {"tensor", "module", "scale", "multiplier", "norm"}, ("tensor", "module"), path, "embedding")
    _check_name(emb, "tensor", path, "embedding", optional=False)
    _check_name(emb, "module", path, "embedding", optional=False)
    for key in ("scale", "multiplier"):
        if emb.get(key) is None:
            continue
        scale = emb[key]
        _check_keys(scale, {"sqrt", "config", "value"}, (), path, f"embedding.{key}")
        if len(scale) != 1:
            raise _fail(path, f"embedding.{key}", "must hold exactly one of sqrt, config, value")
        (k, v), = scale.items()
        if (k == "value" and not _is_num(v)) or (k != "value" and not (isinstance(v, str) and v)):
            raise _fail(path, f"embedding.{key}.{k}", "must be a number" if k == "value" else "must be a key name")
    if emb.get("norm") is not None:
        _check_norm(emb["norm"], path, "embedding.norm")
    if data.get("attn_norm") is not None:
        _check_norm(data["attn_norm"], path, "attn_norm")
    _check_name(data, "attention_module", path, "", optional=False)
    projs = data["projections"]
    if not isinstance(projs, list) or not projs:
        raise _fail(path, "projections", "must be a non-empty list")
    for i, p in enumerate(projs):
        where = f"projections[{i}]"
        _check_keys(p, {"role", "weight", "bias", "bias_when", "module", "heads_interleaved", "width", "low_rank",
                        "out_norm", "zero_masked"}, ("role", "weight", "module"), path, where)
        if p["role"] not in PROJ_ROLES:
            raise _fail(path, f"{where}.role", f"is '{p['role']}', expected one of {', '.join(PROJ_ROLES)}")
        _check_projection_extras(p, path, where)
        for key in ("weight", "module"):
            _check_name(p, key, path, where, optional=False)
        _check_name(p, "bias", path, where)
        if not isinstance(p.get("bias_when", True), (bool, str)):
            raise _fail(path, f"{where}.bias_when", "must be true, false or a config.json key")
        if not isinstance(p.get("heads_interleaved", False), bool):
            raise _fail(path, f"{where}.heads_interleaved", "must be true or false")
    qk = data.get("qk_norm")
    if qk is not None:
        _check_keys(qk, {"q", "k", "over"}, (), path, "qk_norm")
        if qk.get("over", "head") not in QK_NORM_SPANS:
            raise _fail(path, "qk_norm.over", f"is '{qk['over']}', expected head or projection")
        for role in ("q", "k"):
            if role in qk:
                _check_norm(qk[role], path, f"qk_norm.{role}", per_head=qk.get("over", "head") == "head")
    roles = sorted(p["role"] for p in projs)
    if roles not in ROLE_SETS:
        raise _fail(path, "projections", "must hold q, k and v, or one fused qkv, or mla_q and mla_kv (latent "
                                         "attention), or one mixer_in (a sequence mixer other than attention)")
    if data["block"] == "parallel" and not data.get("ffn"):
        raise _fail(path, "ffn", "is missing (a parallel block folds layer 0's FFN into the table)")
    if data.get("ffn"):
        ffn = data["ffn"]
        _check_keys(ffn, {"kind", "activation", "norm", "up", "gate", "down", "module", "router", "experts",
                          "expert_kind", "top_k", "normalize_topk", "shared"},
                    ("kind", "activation", "up", "down", "module"), path, "ffn")
        if ffn["kind"] not in FFN_KINDS:
            raise _fail(path, "ffn.kind", f"is '{ffn['kind']}', expected one of {', '.join(FFN_KINDS)}")
        if ffn["kind"] == "moe":
            for k in ("router", "experts", "top_k"):
                if k not in ffn:
                    raise _fail(path, f"ffn.{k}", "is missing (a mixture-of-experts FFN needs router, experts, top_k)")
            _check_tensor_ref(ffn["router"], path, "ffn.router")
            for k in ("experts", "top_k"):
                _check_config_ref(ffn[k], path, f"ffn.{k}", _is_num)
            ntk = ffn.get("normalize_topk", True)
            if not isinstance(ntk, bool):
                _check_keys(ntk, {"config", "default"}, ("config",), path, "ffn.normalize_topk")
            if ffn.get("expert_kind", "glu") not in EXPERT_KINDS:
                raise _fail(path, "ffn.expert_kind", f"is '{ffn['expert_kind']}', expected mlp or glu")
            for part in ("up", "gate", "down"):
                ref = ffn.get(part)
                if ref is not None and "{e}" not in (ref if isinstance(ref, str) else ref.get("weight", "")):
                    raise _fail(path, f"ffn.{part}", "must contain {e} (the expert index) in a moe FFN")
            if ffn.get("shared") is not None:
                sh = ffn["shared"]
                _check_keys(sh, {"up", "gate", "down", "combine"}, ("up", "down"), path, "ffn.shared")
                for part in ("up", "gate", "down"):
                    if part in sh:
                        _check_tensor_ref(sh[part], path, f"ffn.shared.{part}")
                if sh.get("combine", "sum") not in ("sum", "average"):
                    raise _fail(path, "ffn.shared.combine", f"is '{sh['combine']}', expected sum or average")
                if ffn.get("expert_kind", "glu") == "glu" and "gate" not in sh:
                    raise _fail(path, "ffn.shared.gate", "is missing (the experts are GLUs)")
        elif ffn.get("shared") is not None:
            raise _fail(path, "ffn.shared", "applies to a moe FFN only")
        act = ffn["activation"]
        if isinstance(act, dict):
            _check_keys(act, {"config", "default"}, ("config",), path, "ffn.activation")
            if not isinstance(act["config"], str) or act.get("default", "silu") not in ACTIVATIONS:
                raise _fail(path, "ffn.activation", f"must name a config key and a default among "
                                                    f"{', '.join(ACTIVATIONS)}")
        elif act not in ACTIVATIONS:
            raise _fail(path, "ffn.activation", f"is '{act}', expected one of {', '.join(ACTIVATIONS)}")
        if (ffn["kind"] == "glu" or (ffn["kind"] == "moe" and ffn.get("expert_kind", "glu") == "glu")) \
                and "gate" not in ffn:
            raise _fail(path, "ffn.gate", "is missing (a GLU FFN has a gate projection)")
        for part in ("up", "gate", "down"):
            if part in ffn:
                _check_tensor_ref(ffn[part], path, f"ffn.{part}")
        _check_name(ffn, "module", path, "ffn", optional=False)
        if ffn.get("norm") not in (None, "shared"):
            _check_norm(ffn["norm"], path, "ffn.norm")


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


def read_yaml(path: Path, what: str, flag: str = "") -> Any:
    """Parse a user's YAML file (a profile, a zoo); every failure is one line naming the file."""
    check_regular(path, f"{what} ")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found; pass an existing YAML file{flag}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} cannot be read ({e}); pass a readable UTF-8 YAML file") from None
    try:
        return yaml.load(text, Loader=YAML_LOADER)
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to be parsed; fix it") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{what} {path} is not valid YAML{where}; fix its syntax") from None


def load_profile(path: str | Path) -> Profile:
    """Read and validate one YAML profile."""
    path = Path(path)
    data = read_yaml(path, "profile", " to --profile")
    validate_profile(data, str(path))
    return Profile(name=data["name"], path=str(path), data=data, text=path.read_text(encoding="utf-8"))


def recorded_profile(manifest: Manifest, where: str) -> Profile | None:
    """The profile a conversion was made with, from its manifest (`where`); None for manifests without it."""
    rec = manifest.profile
    text = rec.text
    if text is None:
        return None
    label = f"{where} (the profile recorded from {rec.path})"
    try:
        data = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError:
        raise UserError(f"{label} is not valid YAML; the manifest is damaged, pass --profile or convert again") \
            from None
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


def builtin_profiles() -> list[Profile]:
    """The profiles shipped in configs/, sorted by name."""
    return [load_profile(p) for p in sorted(_configs_dir().glob("*.yaml")) if not p.name.startswith("_")]


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
    profiles = builtin_profiles() if shipped is None else shipped
    for arch in archs:
        for p in profiles:
            if arch in p.architectures:
                return p
    for p in profiles:
        if model_type in p.model_types:
            return p
    known = ", ".join(sorted({a for p in profiles for a in p.architectures}))
    what = f"architecture {archs[0]}" if archs else f"model type '{model_type}'"
    raise UserError(f"no profile for {what}; supported: {known}. "
                    f"Write one (configs/README.md) and pass it with --profile")


def _config_value(config: dict, spec: Any, name: str, profile: Profile) -> Any:
    """Resolve a `sizes` entry: a number, a list of config keys (first present wins) or {keys, default}."""
    if isinstance(spec, (int, float)):  # a literal (booleans too: multi_query: true)
        return spec
    keys, default, has_default = (spec, None, False) if isinstance(spec, list) else (
        spec["keys"], spec.get("default"), "default" in spec)
    for k in keys:
        val = expression_value(config, k) if is_expression(k) else config_get(config, k)
        if val is not None:
            return val
    if has_default:
        return default
    return None


def config_get(config: dict, key: str) -> Any:
    """config[key]; a dotted key reads a nested section (DBRX's `attn_config.kv_n_heads`) or a list's entry by its
    index (`layer_types.0`: layer 0's mixer)."""
    if key in config:
        return config[key]
    head, dot, rest = key.partition(".")
    sub = config.get(head) if dot else None
    if isinstance(sub, list) and rest.partition(".")[0].isdigit():
        index, _, rest = rest.partition(".")
        sub = sub[int(index)] if int(index) < len(sub) else None
        return sub if not rest else config_get(sub, rest) if isinstance(sub, dict) else None
    return config_get(sub, rest) if isinstance(sub, dict) else None


def _norm(obj: dict | None, config: dict, profile: Profile, where: str) -> Norm | None:
    if obj is None:
        return None
    eps = obj["eps"]
    if isinstance(eps, (list, dict)):
        eps_val = _config_value(config, eps, f"{where}.eps", profile)
        if eps_val is None:
            raise UserError(f"config.json has none of {eps if isinstance(eps, list) else eps['keys']}, read by key "
                            f"'{where}.eps' of profile {profile.path}; add it to config.json, or name the key the "
                            f"model's config.json uses (or a number) in the profile")
        eps = eps_val
    if not _is_num(eps):
        raise UserError(f"{where}.eps of profile {profile.name} resolves to {eps!r}, not a number; fix config.json "
                        f"or the profile")
    return Norm(kind=obj["kind"], weight=obj.get("weight"), bias=obj.get("bias"), eps=float(eps),
                offset=float(obj.get("offset", 0.0)), module=obj.get("module"))


def _tensor_ref(obj: Any) -> tuple[str, str | None]:
    if isinstance(obj, str):
        return obj, None
    return obj["weight"], obj.get("bias")


def with_defaults(profile: Profile, config: dict) -> dict:
    """config.json with the profile's `defaults` filled in where a key is absent or null.

    Hub configs often omit values that equal the transformers defaults (Falcon-40B has no
    `num_ln_in_parallel_attn`); the profile states them so that variants match as the model behaves.
    """
    out = dict(config)
    for k, v in (profile.data.get("defaults") or {}).items():
        if out.get(k) is None:
            out[k] = v
    return out


def _matches(when: dict, config: dict) -> bool:
    return all(config_get(config, k) == v for k, v in when.items())


def effective_data(profile: Profile, config: dict) -> dict:
    """The profile with every variant whose `when` matches config.json applied, in order."""
    config = with_defaults(profile, config)
    data = profile.data
    for variant in data.get("variants") or []:
        if _matches(variant["when"], config):
            data = _apply_patch(data, variant["set"])
    return data


def _activation(act: Any, config: dict) -> str:
    """An activation name, or {config, default} read from config.json, in the profile's vocabulary."""
    if isinstance(act, dict):
        act = config.get(act["config"]) or act.get("default")
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "swish": "silu"}.get(act, act)
        if act not in ACTIVATIONS:
            raise UserError(f"activation '{act}' of config.json is not supported; "
                            f"supported: {', '.join(ACTIVATIONS)}")
    return act


def _ffn(f: dict, config: dict, profile: Profile) -> Ffn:
    act = _activation(f["activation"], config)
    fnorm = None if f.get("norm") in (None, "shared") else _norm(f["norm"], config, profile, "ffn.norm")
    gate = _tensor_ref(f["gate"]) if f.get("gate") else None
    up, down = _tensor_ref(f["up"]), _tensor_ref(f["down"])
    if f["kind"] != "moe":
        return Ffn(kind=f["kind"], activation=act, norm=fnorm, up=up, gate=gate, down=down, module=f["module"])
    n = int(_config_value(config, f["experts"], "ffn.experts", profile) or 0)
    top_k = int(_config_value(config, f["top_k"], "ffn.top_k", profile) or 0)
    if n < 1 or not 1 <= top_k <= n:
        raise UserError(f"config.json gives {n} experts and top_k {top_k} for profile {profile.name}; "
                        f"need at least one expert and 1 <= top_k <= experts")
    norm_topk = f.get("normalize_topk", True)
    if isinstance(norm_topk, dict):
        norm_topk = config.get(norm_topk["config"], norm_topk.get("default", True))

    def expand(ref: tuple[str, str | None] | None, e: int) -> tuple[str, str | None] | None:
        return None if ref is None else (ref[0].replace("{e}", str(e)), ref[1] and ref[1].replace("{e}", str(e)))

    kind = f.get("expert_kind", "glu")
    experts = tuple(Expert(kind=kind, up=expand(up, e), gate=expand(gate, e), down=expand(down, e))
                    for e in range(n))
    sh = f.get("shared")
    shared = None if not sh else Expert(kind=kind, up=_tensor_ref(sh["up"]), down=_tensor_ref(sh["down"]),
                                        gate=_tensor_ref(sh["gate"]) if sh.get("gate") else None)
    return Ffn(kind="moe", activation=act, norm=fnorm, up=up, gate=gate, down=down, module=f["module"],
               experts=experts, router=_tensor_ref(f["router"]), top_k=top_k, normalize_topk=bool(norm_topk),
               shared=shared, shared_combine=(sh or {}).get("combine", "sum"))


def _projection_extras(p: dict, config: dict, profile: Profile, where: str, ref_count) -> dict[str, Any]:
    """A projection's width, low-rank input and output norm, resolved (the keys of `Projection` they set)."""
    out: dict[str, Any] = {"zero_masked": bool(p.get("zero_masked"))}
    if "width" in p:
        out["width"] = ref_count(p["width"], f"{where}.width")
    lr = p.get("low_rank")
    if lr:
        out["low_rank"] = LowRank(weight=lr["weight"], bias=lr.get("bias"), module=lr["module"],
                                  rank=ref_count(lr["rank"], f"{where}.low_rank.rank"),
                                  norm=_norm(lr.get("norm"), config, profile, f"{where}.low_rank.norm"))
    on = p.get("out_norm")
    if on:
        out["out_norm"] = _norm({k: v for k, v in on.items() if k != "width"}, config, profile, f"{where}.out_norm")
        out["out_norm_width"] = ref_count(on["width"], f"{where}.out_norm.width")
        if out["out_norm_width"] > out.get("width", out["out_norm_width"]):
            raise UserError(f"profile {profile.path}: {where}.out_norm.width ({out['out_norm_width']}) exceeds the "
                            f"projection's width ({out['width']}); fix the profile or config.json")
    return out


def resolve(profile: Profile, config: dict, assume_parallel: bool = False) -> ModelSpec:
    """Resolve a profile against config.json into concrete sizes and names."""
    config = with_defaults(profile, config)
    for entry in profile.data.get("refuse") or []:
        if _matches(entry["when"], config):
            what = ", ".join(f"{k}={json.dumps(v)}" for k, v in entry["when"].items())
            raise UserError(f"{profile.name} with {what} cannot be precompiled: {entry['reason']}")
    data = effective_data(profile, config)
    sizes = data["sizes"]

    def size(name: str, required: bool = True) -> Any:
        val = _config_value(config, sizes[name], name, profile) if name in sizes else None
        if val is None and required:
            spec = sizes.get(name)
            keys = spec if isinstance(spec, list) else (spec or {}).get("keys", [name])
            raise UserError(f"config.json lacks {' or '.join(map(str, keys))}, read by key 'sizes.{name}' of profile "
                            f"{profile.path}; add it to config.json, or name the key the model's config.json uses in "
                            f"the profile")
        return val

    def count(name: str, required: bool = True) -> int | None:
        """A size that must be a positive whole number."""
        val = size(name, required)
        if val is None:
            return None
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val != val or int(val) != val or val <= 0:
            spec = sizes.get(name)
            keys = spec if isinstance(spec, list) else spec.get("keys", []) if isinstance(spec, dict) else []
            key = next((k for k in keys if config.get(k) is not None), None)
            where = f"config.json gives {key}" if key else f"profile {profile.name} gives sizes.{name}"
            raise UserError(f"{where} = {val!r} (the model's {name}); it must be a positive whole number")
        return int(val)

    def ref_count(spec: Any, where: str) -> int:
        """A config reference (not a sizes key) that must give a positive whole number."""
        val = _config_value(config, spec, where, profile)
        if isinstance(val, bool) or not _is_num(val) or int(val) != val or val <= 0:
            raise UserError(f"config.json gives {val!r} for key '{where}' of profile {profile.path} "
                            f"({spec}); it must be a positive whole number: fix config.json or the profile")
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
    block = "parallel" if assume_parallel else data["block"]
    tie_spec = data.get("tie_word_embeddings") or {"keys": ["tie_word_embeddings"], "default": False}
    tied = bool(_config_value(config, tie_spec, "tie_word_embeddings", profile))
    emb = data["embedding"]

    def factor(key: str) -> float | None:
        """embedding.scale or embedding.multiplier: sqrt of a size, a config value, or a number."""
        s = emb.get(key)
        if not s:
            return None
        if "sqrt" in s:
            base = count(s["sqrt"]) if s["sqrt"] in sizes else config_get(config, s["sqrt"])
            if not _is_num(base) or base <= 0:
                raise UserError(f"config.json gives {s['sqrt']} = {base!r}, needed as a positive number for the "
                                f"embedding {key} of profile {profile.name}; fix config.json")
            return math.sqrt(float(base))
        if "config" in s:
            val = config_get(config, s["config"])
            val = 1.0 if val is None else val
            if not _is_num(val):
                raise UserError(f"config.json gives {s['config']} = {val!r}, needed as a number for the embedding "
                                f"{key} of profile {profile.name}; fix config.json")
            return float(val)
        return float(s["value"])

    scale, multiplier = factor("scale"), factor("multiplier")
    if multiplier is not None and block == "parallel":
        raise UserError(f"profile {profile.name}: embedding.multiplier with a parallel block is not supported (the "
                        f"table's x + FFN would have to be divided by it); drop one of them")
    ffn = _ffn(data["ffn"], config, profile) if data.get("ffn") else None
    projections = []
    for i, p in enumerate(data["projections"]):
        when = p.get("bias_when", True)
        required = bool(config.get(when, False)) if isinstance(when, str) else bool(when)
        projections.append(Projection(role=p["role"], weight=p["weight"], bias=p.get("bias"),
                                      bias_required=required and p.get("bias") is not None,
                                      module=p["module"], heads_interleaved=bool(p.get("heads_interleaved")),
                                      **_projection_extras(p, config, profile, f"projections[{i}]", ref_count)))
    qk = data.get("qk_norm") or {}
    qk_norms = {role: _norm(qk[role], config, profile, f"qk_norm.{role}") for role in ("q", "k") if role in qk}
    if qk_norms and any(p.role == "qkv" and p.heads_interleaved for p in projections) and (
            heads != kv or qk.get("over", "head") != "head"):
        raise UserError(f"profile {profile.name}: qk_norm on a heads_interleaved qkv needs as many key/value heads as "
                        f"heads and per-head norms; fix the YAML or config.json")
    attn_norm = _norm(data.get("attn_norm"), config, profile, "attn_norm")
    emb_norm = _norm(emb.get("norm"), config, profile, "embedding.norm")
    identity = [m for m in (emb_norm.module if emb_norm else None, attn_norm.module if attn_norm else None) if m]
    if block == "parallel" and ffn is not None and ffn.norm is not None and ffn.norm.module:
        identity.append(ffn.norm.module)
    identity += [n.module for n in qk_norms.values() if n.module]
    identity += [m for p in projections for m in p.identity_modules]
    inter = size("intermediate_size", required=False)
    n_exp = size("n_experts", required=False)
    return ModelSpec(
        profile=profile.name, block=block, hidden_size=d, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
        vocab_size=count("vocab_size"), n_layers=count("n_layers"),
        intermediate_size=count("intermediate_size", required=False) if inter is not None else None,
        n_experts=len(ffn.experts) if ffn is not None and ffn.experts else (
            count("n_experts", required=False) if n_exp else 1), ffn_kind=(data.get("ffn") or {}).get("kind", "glu"),
        tied=tied, embedding_tensor=emb["tensor"], embedding_module=emb["module"], embedding_scale=scale,
        embedding_norm=emb_norm, attn_norm=attn_norm,
        projections=tuple(projections), attention_module=data["attention_module"], ffn=ffn,
        identity_modules=tuple(identity), qk_norms=qk_norms, qk_norm_span=qk.get("over", "head"),
        embedding_multiplier=multiplier, shared_intermediate_size=(
            count("shared_intermediate_size") if size("shared_intermediate_size", required=False) else None),
    )
