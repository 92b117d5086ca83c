"""What a profile resolves to for one config.json: layer 0's sizes, tensor names and module paths.

`ModelSpec` and its parts (norms, projections, FFNs, experts) are the typed result of resolving a profile
(`precompile.profiles.profile_resolution.resolve`); the plan, the table math and the checks read only these,
never the profile's YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from precompile.profiles.sections import HEAD


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
