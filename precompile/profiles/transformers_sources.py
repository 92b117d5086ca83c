"""What transformers' modeling sources say about a model's layer 0, read as text and parsed with `ast`
(never imported, so no model code runs): what the decoder layer feeds its attention, whether the FFN reads the
same normed input (a parallel block), how the embedding is scaled, how q/k are projected and normed, and whether
absolute position embeddings are added before layer 0. The support matrix (`precompile.profiles.support`)
classifies model types from these facts.
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from precompile.profiles.shipped import Layer0Shape

_POSITION_ATTR = re.compile(r"^(wpe|embed_positions|positions_embed|position_embeddings?|positional_embeddings?|"
                            r"pos_emb\w*|embed_pos\w*|pos_embed\w*)$")
_FUSED = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "W_pack", "in_proj", "qkv_linear")
_SEPARATE = ("q_proj", "query", "q", "wq", "q_linear")
_PROJ_NAMES = {*_FUSED, *_SEPARATE, "q_a_proj", "kv_a_proj_with_mqa", "kv_a_proj", "k_proj", "v_proj", "key", "value",
               "k", "v", "wk", "wv", "k_linear", "v_linear"}
_LATENT = ("q_a_proj", "kv_a_proj_with_mqa", "kv_a_proj")
_QK_NORM = re.compile(r"self\.(q_norm|q_layernorm|query_layernorm|q_ln|query_norm)\s*=\s*([\w.]+)\((.*)")
_OUTSIDE_SCALE = re.compile(r"inputs_embeds\s*\*(?!\*)|\*\s*inputs_embeds\b")


# ----------------------------------------------------------------------------------------- source facts


@dataclass(frozen=True)
class SourceFacts:
    """Facts read from a modeling module's source."""

    shape: Layer0Shape
    absolute_positions: bool
    found: bool  # the decoder layer and its attention call were found
    attn_input: str = "in"  # what the attention's norm reads: "in" (the layer's input) or "other"
    attention_attrs: tuple[str, ...] = ()  # the attention class's own modules (named where none is a projection)
    reads_embedding_weight: str = ""  # the base model's forward reads `self.<embedding>.weight` (the attribute)
    shared_norm: str = ""  # a norm module the base model's forward applies both before and after its layers
    attention_readers: tuple[str, ...] = ()  # modules besides q/k/v the attention applies to its input (a gate)
    normed_residual: str = ""  # the attention's norm whose output the layer also adds to the residual stream
    embeds_through: tuple[str, ...] = ()  # modules the base model's forward passes the embedding's output through


def _models_dir() -> Path:
    import transformers

    return Path(transformers.__file__).parent / "models"


@lru_cache(maxsize=1)
def class_index() -> dict[str, Path]:
    """Class name -> the modeling file defining it (a text scan; nothing is imported)."""
    out: dict[str, Path] = {}
    pattern = re.compile(r"^class (\w+)\(", re.MULTILINE)
    for f in sorted(_models_dir().glob("*/modeling_*.py")):
        for name in pattern.findall(f.read_text(encoding="utf-8")):
            out.setdefault(name, f)
    return out


class _Module:
    """A modeling file's top-level classes, each parsed only when asked for (whole files take seconds)."""

    def __init__(self, path: Path):
        text = path.read_text(encoding="utf-8")
        self._text: dict[str, str] = {}
        self._tree: dict[str, ast.ClassDef | None] = {}
        starts = [m.start() for m in re.finditer(r"^[^\s#)\]}]", text, re.MULTILINE)] + [len(text)]
        for a, b in itertools.pairwise(starts):
            m = re.match(r"class (\w+)\b", text[a:b])
            if m:
                self._text.setdefault(m.group(1), text[a:b])

    def __contains__(self, name: object) -> bool:
        return name in self._text

    def get(self, name: str | None) -> ast.ClassDef | None:
        if name not in self._text:
            return None
        if name not in self._tree:
            try:
                node = ast.parse(self._text[name]).body[0]
            except SyntaxError:
                node = None
            self._tree[name] = node if isinstance(node, ast.ClassDef) else None
        return self._tree[name]

    def source(self, name: str, node: ast.AST) -> str:
        """The source text of a node inside class `name`."""
        lines = self._text[name].splitlines()
        return "\n".join(lines[node.lineno - 1:node.end_lineno])


@cache
def _module(path: Path) -> _Module:
    return _Module(path)


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    return next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name), None)


def _self_assigns(cls: ast.ClassDef) -> dict[str, ast.expr]:
    """`self.attr = value` in __init__ (the first assignment of each attr)."""
    init = _method(cls, "__init__")
    out: dict[str, ast.expr] = {}
    for node in ast.walk(init) if init else ():
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    out.setdefault(t.attr, node.value)
    return out


def _called_class(value: ast.expr) -> str | None:
    """`Foo(...)` / `nn.Foo(...)` -> 'Foo'."""
    if isinstance(value, ast.Call):
        f = value.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return None


def _either_class(value: ast.expr) -> str | None:
    """`_called_class`, also of `A(...) if cond else B(...)` where both are norms (of one kind, or 'NormByConfig');
    None where the two differ otherwise (ModernBERT's layer 0 gets an Identity, the others a LayerNorm)."""
    if not isinstance(value, ast.IfExp):
        return _called_class(value)
    a, b = _called_class(value.body), _called_class(value.orelse)
    if a == b:
        return a
    if a and b and "norm" in a.lower() and "norm" in b.lower():
        return a if _norm_kind(a) == _norm_kind(b) else "NormByConfig"
    return None


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _classify_attr(cls_name: str | None, attr: str) -> str | None:
    """'norm', 'attn' or 'mlp' for a submodule of a decoder layer, from its class and attribute names."""
    name = (cls_name or "").lower()
    if "norm" in name:
        return "norm"
    if "attention" in name or "attn" in name or attr in ("self_attn", "attn", "attention", "self_attention"):
        return "attn"
    if any(k in name for k in ("mlp", "moe", "feedforward", "experts", "ffn")) or attr in (
            "mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"):
        return "mlp"
    return None


class _Flow:
    """Follows a decoder layer's forward: what the attention and the FFN read, in terms of the input."""

    def __init__(self, roles: dict[str, str], first_arg: str):
        self.roles = roles
        self.env = {first_arg: "in"}
        self.attn_in: str | None = None
        self.mlp_in: list[str] = []  # every FFN call's input (a block may be serial or parallel by config)
        self.normed_residual = ""  # a norm of the layer's input that a residual sum adds (MiniMax's)

    def label(self, e: ast.expr) -> str:
        if isinstance(e, ast.Name):
            return self.env.get(e.id, "other")
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and isinstance(e.func.value, ast.Name) \
                and e.func.value.id == "self":
            role = self.roles.get(e.func.attr)
            arg = e.args[0] if e.args else next((k.value for k in e.keywords if k.arg == "hidden_states"), None)
            inner = self.label(arg) if arg is not None else "other"
            if role == "norm":
                return f"norm({e.func.attr}):{inner}"
            if role == "attn" and self.attn_in is None:
                self.attn_in = inner
                return "attn"
            if role == "mlp":
                self.mlp_in.append(inner)
                return "mlp"
            return "other"
        if isinstance(e, ast.BinOp):
            if isinstance(e.op, ast.Add):
                for n in ast.walk(e):
                    lab = self.env.get(n.id, "") if isinstance(n, ast.Name) else ""
                    if lab.startswith("norm(") and _root(lab) == "in":
                        self.normed_residual = lab.split(":", 1)[0][5:-1]
            self.label(e.left), self.label(e.right)
            return "sum" if isinstance(e.op, ast.Add) else "other"
        for child in ast.iter_child_nodes(e):
            if isinstance(child, ast.expr):
                self.label(child)
        return "other"

    def run(self, body: list[ast.stmt]) -> None:
        for st in body:
            if isinstance(st, ast.Assign):
                val = self.label(st.value)
                for t in st.targets:
                    if isinstance(t, ast.Name):
                        self.env[t.id] = val
                    elif isinstance(t, ast.Tuple) and t.elts and isinstance(t.elts[0], ast.Name):
                        self.env[t.elts[0].id] = val
            elif isinstance(st, (ast.If, ast.With, ast.For)):
                self.run(st.body)
                self.run(getattr(st, "orelse", []))
            elif isinstance(st, (ast.Expr, ast.Return, ast.AugAssign)) and st.value is not None:
                self.label(st.value)


def _root(label: str) -> str:
    while label.startswith("norm("):
        label = label.split(":", 1)[1]
    return label


def _norm_kind(cls_name: str | None) -> str:
    name = (cls_name or "").lower()
    return "rms" if "rms" in name else "layer" if "layernorm" in name or "layer_norm" in name else "?"


def _layer_classes(base: ast.ClassDef, mod: _Module) -> list[ast.ClassDef]:
    """Decoder-layer classes the base model builds, those whose forward calls an attention module first."""
    init = _method(base, "__init__")
    names = sorted(n for n in (_names_in(init) if init else ()) if n in mod and n.endswith(("Layer", "Block")))
    layers = [c for c in map(mod.get, names) if c is not None and _method(c, "forward")]
    return sorted(layers, key=lambda c: not any(_classify_attr(_called_class(v), a) == "attn"
                                                for a, v in _self_assigns(c).items()))


def _attention_facts(layer: ast.ClassDef, mod: _Module) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """(projections, qk_norm, the attention's module attributes, the modules other than q/k/v projections that
    its forward applies to its input: a gate, an indexer) of the layer's attention class."""
    name = next((c for a, v in _self_assigns(layer).items()
                 if _classify_attr(c := _called_class(v), a) == "attn" and c in mod), None)
    attn_cls = mod.get(name)
    attrs = set(_self_assigns(attn_cls)) if attn_cls else set()
    proj = "latent" if attrs & set(_LATENT) else "fused" if attrs & set(_FUSED) else \
        "separate" if attrs & set(_SEPARATE) else "?"
    qk = "-"
    m = _QK_NORM.search(mod.source(name, attn_cls) if attn_cls else "")
    if m:
        args = m.group(3)
        full = re.search(r"num_(attention_)?heads|hidden_size|\bdim\b|embed_dim", args) and "head_dim" not in args \
            or re.search(r"num_(attention_)?heads\s*\*|\*\s*self\.head_dim", args)
        qk = "full width" if full else "per head"
    modules = tuple(sorted(a for a, v in (_self_assigns(attn_cls) if attn_cls else {}).items()
                           if (c := _called_class(v.body if isinstance(v, ast.IfExp) else v))
                           and c[:1].isupper() and "Dropout" not in c))
    fwd = _method(attn_cls, "forward") if attn_cls else None
    arg = fwd.args.args[1].arg if fwd and len(fwd.args.args) > 1 else None
    calls = re.finditer(rf"self\.(\w+)\(\s*{arg}\b", mod.source(name, fwd)) if arg else ()
    readers = tuple(sorted({m.group(1) for m in calls
                            if m.group(1) in modules and m.group(1) not in _PROJ_NAMES
                            and not re.search("rotary|rope", m.group(1))}))
    extra_args = tuple(sorted({c.func.attr for c in ast.walk(fwd) if isinstance(c, ast.Call)
                               and isinstance(c.func, ast.Attribute) and c.func.attr in _PROJ_NAMES
                               and isinstance(c.func.value, ast.Name) and c.func.value.id == "self"
                               and len(c.args) + len(c.keywords) > 1})) if fwd else ()
    return proj, qk, modules, readers + tuple(f"{a}(extra arguments)" for a in extra_args)


def source_facts(arch: str, mixer: str) -> SourceFacts | None:
    """Facts about `arch`'s layer 0 from its modeling source; None when the class is not found."""
    path = class_index().get(arch)
    if path is None:
        return None
    mod = _module(path)
    top = mod.get(arch)
    base_name = next((c for c in (_called_class(v) for v in (_self_assigns(top) if top else {}).values())
                      if c in mod and any("embedding" in (_called_class(v) or "").lower()
                                          for v in _self_assigns(mod.get(c)).values())), None)
    base = mod.get(base_name)
    if base is None:
        return SourceFacts(Layer0Shape(mixer, "?", "?", "?", "-", "-"), False, False)
    assigns = _self_assigns(base)
    absolute = any(_POSITION_ATTR.match(a) and "rotary" not in (_called_class(v) or "").lower()
                   and "rope" not in (_called_class(v) or "").lower() for a, v in assigns.items())
    emb_cls = next((_called_class(v) for v in assigns.values() if "embedding" in (_called_class(v) or "").lower()),
                   None)
    if emb_cls in mod:  # an embeddings module of its own (BERT-style): positions may live inside it
        absolute = absolute or any(_POSITION_ATTR.match(a) for a in _self_assigns(mod.get(emb_cls)))
    fwd = _method(base, "forward")
    fwd_src = mod.source(base_name, fwd) if fwd else ""
    scale = "module" if "scaled" in (emb_cls or "").lower() else \
        "outside the module" if _OUTSIDE_SCALE.search(fwd_src) else "-"
    emb_attr = next((a for a, v in assigns.items() if "embedding" in (_called_class(v) or "").lower()), None)
    # reading only the weight's device or dtype is served by the converted embedding's `.weight` (loader.py);
    # reading its values is not (untied, `.weight` is the table's x columns)
    weight_read = re.search(rf"self\.{re.escape(emb_attr)}\.weight\b(?!\.(device|dtype)\b)", fwd_src) \
        if emb_attr else None
    embeds_through = sorted({m.group(1) for m in re.finditer(r"inputs_embeds\s*=\s*self\.(\w+)\(", fwd_src)
                             if m.group(1) != emb_attr and "dropout" not in m.group(1)})
    loop = re.search(r"^\s*for .* in .*self\.(layers|h|blocks|layer)\b", fwd_src, re.MULTILINE)
    shared_norm = next((n for n, v in assigns.items() if _classify_attr(_called_class(v), n) == "norm" and loop
                        and f"self.{n}(" in fwd_src[:loop.start()] and f"self.{n}(" in fwd_src[loop.end():]), "")
    for layer in _layer_classes(base, mod):
        sub = {a: _either_class(v) for a, v in _self_assigns(layer).items()}
        roles = {a: r for a, c in sub.items() if (r := _classify_attr(c, a))}
        fn = _method(layer, "forward")
        args = [a.arg for a in fn.args.args[1:]]
        if not args:
            continue
        flow = _Flow(roles, args[0])
        flow.run(fn.body)
        if flow.attn_in is None:
            continue
        norm_attr = flow.attn_in.split(":", 1)[0][5:-1] if flow.attn_in.startswith("norm(") else None
        norm = _norm_kind(sub.get(norm_attr)) if norm_attr else "none" if flow.attn_in == "in" else "?"
        kinds = {"parallel" if _root(m) == "in" else "serial" for m in flow.mlp_in}
        block = "?" if not kinds else kinds.pop() if len(kinds) == 1 else "serial or parallel"
        proj, qk, modules, readers = _attention_facts(layer, mod)
        return SourceFacts(Layer0Shape(mixer, block, norm, proj, qk, scale), absolute, True,
                      "in" if _root(flow.attn_in) == "in" else "other", modules,
                      weight_read.group(0) if weight_read else "", shared_norm, readers, flow.normed_residual,
                      tuple(embeds_through))
    return SourceFacts(Layer0Shape(mixer, "?", "?", "?", "-", scale), absolute, False)
