"""The profile schema: one dataclass per section of a profile (configs/*.yaml), each key with its help text.

This is the single definition of what a profile may say. `precompile.profiles.profile_resolution` validates and parses
profiles with it and resolves the parsed definition against config.json; configs/README.md's key table is
generated from it (`python -m precompile.profiles --write-key-table`). To add a key, add a field with
`key(help, default, ...)` to its section (and a `check` rule when it relates to other keys), read it in
`profile_resolution.resolve`, and regenerate the key table; a new section also goes into the profile that
tests/profiles/test_profile_schema.py exercises every section with (`FULL`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from precompile.profiles.config_values import ConfigValue, FlagValue, SizeValue
from precompile.profiles.yaml_schema import Fail, key

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
QK_NORM_SPANS = ("head", "projection")
SHARED_COMBINE = ("sum", "average")
HEAD = "{h}"  # in a per-head norm's tensor names: one tensor per head (StableLM's q_layernorm.norms.{h})
EXPERT = "{e}"  # in a moe FFN's tensor names: the expert index


# ----------------------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class Match:
    """Match.
    Which checkpoints a profile in configs/ is the default for, by config.json's `architectures` (tried
    first) and `model_type`; at least one name."""

    architectures: tuple[str, ...] = key("class names from config.json's `architectures`", ())
    model_types: tuple[str, ...] = key("names from config.json's `model_type`", ())

    def check(self, fail: Fail, where: str) -> None:
        if not (self.architectures or self.model_types):
            raise fail(where, "must list architectures or model_types")


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """Sizes.
    Each a size value read from config.json; a dotted key reads a nested config section."""

    hidden_size: SizeValue = key("the model width d")
    num_heads: SizeValue = key("attention heads")
    vocab_size: SizeValue = key("embedding rows")
    n_layers: SizeValue = key("decoder layers (for `plan`'s whole-model figures and `verify`'s rounding "
                              "allowance; the self-check builds every layer config.json gives, whatever this reads)")
    num_kv_heads: SizeValue | None = key("key/value heads; absent: `num_heads` (1 with `multi_query`)", None)
    head_dim: SizeValue | None = key("width of one head; absent: `hidden_size / num_heads`", None)
    intermediate_size: SizeValue | None = key("the FFN's hidden width (for `plan`)", None)
    n_experts: SizeValue | None = key("experts per layer of a serial MoE (for `plan`)", None)
    multi_query: SizeValue | None = key("true: one key/value head when `num_kv_heads` is absent (Falcon)", None)
    shared_intermediate_size: SizeValue | None = key("a MoE FFN's shared expert width (for `plan`)", None)


@dataclass(frozen=True, kw_only=True)
class Factor:
    """Factor.
    A number the embedding is multiplied by: exactly one of `sqrt`, `config`, `value`."""

    sqrt: str | None = key("the square root of a `sizes` name or a config.json key (Gemma's sqrt(d))", None)
    config: str | None = key("a config.json key holding the number (1 when absent)", None)
    value: float | None = key("the number itself", None)

    def check(self, fail: Fail, where: str) -> None:
        if sum(v is not None for v in (self.sqrt, self.config, self.value)) != 1:
            raise fail(where, "must hold exactly one of sqrt, config, value")


@dataclass(frozen=True, kw_only=True)
class NormDef:
    """Norm.
    A norm over its input's last dimension. Norms compute in float32 (or float64 with `--compute-dtype`);
    the loader replaces its `module` with an identity, since the table holds its output."""

    kind: str = key("RMSNorm or LayerNorm", choices=NORM_KINDS)
    eps: ConfigValue = key("epsilon: a number or config keys")
    weight: str | None = key("the weight tensor (omit weight and bias for a parameter-free LayerNorm)", None,
                             tensor=True)
    bias: str | None = key("the bias tensor", None, tensor=True)
    offset: float = key("the weight is used as `offset + w` (Gemma's `1 + w`)", 0.0)
    module: str | None = key("the module path, replaced by an identity in the loaded model", None)


@dataclass(frozen=True, kw_only=True)
class EmbeddingDef:
    """Embedding.
    The token embedding and what is applied to its rows before layer 0."""

    tensor: str = key("the embedding weight on disk", tensor=True)
    module: str = key("the embedding module (in memory), replaced by a table lookup")
    scale: Factor | None = key("a factor the embedding *module* applies to its rows, rounded to the model dtype "
                               "(Gemma's scaled embedding)", None)
    multiplier: Factor | None = key("a factor the *model's forward* applies to the module's output, outside the "
                                    "module (Granite's `embedding_multiplier`); not with a parallel block", None)
    norm: NormDef | None = key("a norm applied right after the embedding (BLOOM)", None)


@dataclass(frozen=True, kw_only=True)
class LowRankDef:
    """Low-rank input.
    A projection in front of another, with a norm between (MLA's `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`);
    it folds into the table and its modules become identities."""

    weight: str = key("the low-rank projection's weight", tensor=True)
    module: str = key("its module path")
    rank: ConfigValue = key("its output width (config keys or a number)")
    bias: str | None = key("its bias tensor", None, tensor=True)
    norm: NormDef | None = key("the norm between it and the projection", None)


@dataclass(frozen=True, kw_only=True)
class OutNormDef(NormDef):
    """Output norm.
    A norm over the first `width` outputs of a projection, the rest passing unchanged (MLA's kv latent, whose
    rotary part is not normed); the keys of a norm plus `width`."""

    width: ConfigValue = key("how many leading outputs the norm covers")


@dataclass(frozen=True, kw_only=True)
class ProjectionDef:
    """Projection.
    One layer-0 projection whose output goes into the table: `q`, `k` and `v`, or one fused `qkv` (stored
    in the module's own layout), or `mla_q` and `mla_kv` (latent attention: the per-token values before RoPE),
    or one `mixer_in` (the input projection of a sequence mixer other than attention: state-space, short
    convolution)."""

    role: str = key("what the projection computes", choices=PROJ_ROLES)
    weight: str = key("the weight tensor", tensor=True)
    module: str = key("the module path, replaced by a slice of the looked-up row")
    bias: str | None = key("the bias tensor; skipped when the checkpoint lacks it", None, tensor=True)
    bias_when: bool | str = key("a config.json key (or `true`) that makes `bias` required: a missing bias is then "
                                "an error", True, form="true, false or a config.json key")
    heads_interleaved: bool = key("a fused qkv whose layout is per head `[q_h, k_h, v_h]` (Persimmon; the table "
                                  "keeps the module's own layout)", False)
    width: ConfigValue | None = key(f"the output width, required for (and only for) roles without heads: "
                                    f"{', '.join(WIDTH_ROLES)}", None)
    low_rank: LowRankDef | None = key("a low-rank projection (with a norm) this one reads instead of the normed "
                                      "input", None)
    out_norm: OutNormDef | None = key("a norm over the leading outputs", None)
    zero_masked: bool = key("the mixer multiplies its input by the attention mask before this projection (Mamba's, "
                            "LFM2's), so the looked-up output is zero where that input is (exact for a projection "
                            "without bias; refuse a bias with `refuse`)", False)

    def check(self, fail: Fail, where: str) -> None:
        if (self.role in WIDTH_ROLES) != (self.width is not None):
            raise fail(f"{where}.width", f"is {'missing' if self.width is None else 'not allowed'} (role {self.role}: "
                                         f"only {', '.join(WIDTH_ROLES)} name their output width)")


@dataclass(frozen=True, kw_only=True)
class QkNorm:
    """Q/k norms.
    Norms applied to the q and k projection outputs (also to the q and k parts of a fused `qkv`, in its
    `[q | k | v]` or `heads_interleaved` layout); they are per token, so they fold and their modules become
    identities. List only norms that act before RoPE: Hunyuan's act after it and stay at run time (leave
    them out)."""

    q: NormDef | None = key("the norm of q (a per-head norm's tensor names may hold `{h}`: one tensor per head, "
                         "e.g. StableLM's `q_layernorm.norms.{h}.weight`)", None)
    k: NormDef | None = key("the norm of k (as for `q`)", None)
    over: str = key("`head`: each head over `head_dim` (weights `[head_dim]`, `[heads, head_dim]` or one per "
                    "head); `projection`: the whole output before the head split (OLMo 2, OLMoE)", "head",
                    choices=QK_NORM_SPANS)


@dataclass(frozen=True, kw_only=True)
class TensorPair:
    """Weight and bias.
    A linear layer's tensors."""

    weight: str = key("the weight tensor", tensor=True)
    bias: str | None = key("the bias tensor", None, tensor=True)


TensorRef = str | TensorPair  # a weight tensor name, or {weight, bias}


@dataclass(frozen=True, kw_only=True)
class ActivationFromConfig:
    """Activation from config.json.
    The activation named by config.json (`gelu_new`, `gelu_pytorch_tanh` and `gelu_fast` mean `gelu_tanh`,
    `swish` means `silu`)."""

    config: str = key("the config.json key")
    default: str | None = key("the activation when config.json lacks the key", None, choices=ACTIVATIONS)


@dataclass(frozen=True, kw_only=True)
class FlagFromConfig:
    """Flag from config.json.
    A true/false read from config.json."""

    config: str = key("the config.json key")
    default: bool = key("the value when config.json lacks the key", True)


@dataclass(frozen=True, kw_only=True)
class SharedExpertDef:
    """Shared expert.
    A dense expert every token takes besides the routed ones (Cohere 2 MoE)."""

    up: TensorRef = key("up projection", form="a tensor name or {weight, bias}", tensor=True)
    down: TensorRef = key("down projection", form="a tensor name or {weight, bias}", tensor=True)
    gate: TensorRef | None = key("gate projection (required when the experts are GLUs)", None,
                                 form="a tensor name or {weight, bias}", tensor=True)
    combine: str = key("`sum`: added to the routed output; `average`: averaged with it", "sum",
                       choices=SHARED_COMBINE)


@dataclass(frozen=True, kw_only=True)
class FfnDef:
    """FFN.
    Layer 0's FFN. A parallel block folds it into the table's first column (required there); in a serial
    block it is not touched and only feeds `plan`'s whole-model figures (absent: `plan` assumes a GLU)."""

    kind: str = key("`mlp`: `down(act(up h))`; `glu`: `down(act(gate h) * up h)`; `moe`: top-k experts",
                    choices=FFN_KINDS)
    activation: str | ActivationFromConfig = key(
        "the activation (`relu2` is squared ReLU)", choices=ACTIVATIONS,
        form="one of `silu`, `gelu`, `gelu_tanh`, `relu`, `relu2`, or {config, default}")
    up: TensorRef = key("up projection (holds `{e}`, the expert index, in a moe FFN)",
                        form="a tensor name or {weight, bias}", tensor=True)
    down: TensorRef = key("down projection (as `up`)", form="a tensor name or {weight, bias}", tensor=True)
    module: str = key("the FFN module, replaced by zeros in a parallel block")
    gate: TensorRef | None = key("gate projection (a GLU's; as `up`)", None, form="a tensor name or {weight, bias}",
                                 tensor=True)
    norm: NormDef | str | None = key("the FFN's norm in a parallel block; `shared` or absent: the attention norm's "
                                  "output feeds the FFN too", None, choices=("shared",), form="a norm or `shared`")
    router: TensorRef | None = key("moe: the router tensor", None, form="a tensor name or {weight, bias}", tensor=True)
    experts: ConfigValue | None = key("moe: the number of experts", None)
    top_k: ConfigValue | None = key("moe: experts per token", None)
    expert_kind: str = key("moe: each expert's kind", "glu", choices=EXPERT_KINDS)
    normalize_topk: bool | FlagFromConfig = key("moe: renormalise the picked experts' weights", True,
                                                form="true, false or {config, default}")
    shared: SharedExpertDef | None = key("moe: a shared expert", None)

    def check(self, fail: Fail, where: str) -> None:
        glu_experts = self.kind == "moe" and self.expert_kind == "glu"
        if self.kind == "moe":
            for k in ("router", "experts", "top_k"):
                if getattr(self, k) is None:
                    raise fail(f"{where}.{k}", "is missing (a mixture-of-experts FFN needs router, experts, top_k)")
            for part in ("up", "gate", "down"):
                ref = getattr(self, part)
                if ref is not None and EXPERT not in (ref if isinstance(ref, str) else ref.weight):
                    raise fail(f"{where}.{part}", "must contain {e} (the expert index) in a moe FFN")
            if self.shared is not None and self.expert_kind == "glu" and self.shared.gate is None:
                raise fail(f"{where}.shared.gate", "is missing (the experts are GLUs)")
        elif self.shared is not None:
            raise fail(f"{where}.shared", "applies to a moe FFN only")
        if (self.kind == "glu" or glu_experts) and self.gate is None:
            raise fail(f"{where}.gate", "is missing (a GLU FFN has a gate projection)")


@dataclass(frozen=True, kw_only=True)
class DenseLayersDef:
    """Dense layers.
    Which layers of a mixture-of-experts model have a dense GLU FFN instead of the experts; a layer is dense when
    any key says so. `plan` counts them (layer 0's FFN and the whole model); a layer-0 FFN of kind `moe` on a config
    whose layer 0 is dense is refused, and the self-check compares a dense layer 0's output too."""

    first: ConfigValue | None = key("how many leading layers are dense (DeepSeek's and GLM-4-MoE's "
                                    "`first_k_dense_replace`, LFM2-MoE's `num_dense_layers`)", None)
    indices: ConfigValue | None = key("config.json keys holding a list of the dense layers' indices (Qwen-MoE's "
                                      "`mlp_only_layers`)", None)
    types: ConfigValue | None = key("config.json keys holding each layer's FFN type, one entry per layer "
                                    "(`mlp_layer_types`); an entry equal to `dense_type` is dense", None)
    dense_type: str = key("the `types` entry that means a dense layer", "dense")
    sparse_step: ConfigValue | None = key("only every n-th layer has experts: layer i is dense unless (i + 1) % n == 0 "
                                          "(Qwen-MoE's `decoder_sparse_step`)", None)
    intermediate_size: ConfigValue | None = key("the dense FFN's hidden width; absent: `sizes.intermediate_size`",
                                                None)

    def check(self, fail: Fail, where: str) -> None:
        if all(v is None for v in (self.first, self.indices, self.types, self.sparse_step)):
            raise fail(where, "must name at least one of first, indices, types, sparse_step")


@dataclass(frozen=True, kw_only=True)
class Variant:
    """Variant.
    A patch applied when config.json matches: every matching variant's `set` is deep-merged into the profile
    in order (`null` deletes a key)."""

    when: dict[str, Any] = key("config.json keys and the values they must have (a dotted key reads a nested section "
                               "or a list entry: `layer_types.0` is layer 0's type)",
                               form="a mapping (map config keys to values)")
    set: dict[str, Any] = key("profile keys to merge in (a list such as `projections` is replaced whole)",
                              form="a mapping of profile keys")


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Refusal.
    A config the trick cannot apply to."""

    when: dict[str, Any] = key("config.json keys and the values they must have",
                               form="a mapping (map config keys to values)")
    reason: str = key("why, shown to the user")


@dataclass(frozen=True, kw_only=True)
class ProfileDef:
    """Profile.
    The top level of a profile file. A null value is the same as leaving the key out."""

    name: str = key("the profile's name, shown by `plan` / `convert` and recorded in the manifest")
    description: str = key("one line shown by `plan` / `convert`", "")
    match: Match = key("the checkpoints this profile is the default for")
    defaults: dict[str, Any] = key("config values to assume when config.json lacks a key or has it null (hub "
                                   "configs often omit transformers' defaults)", {},
                                   form="a mapping (map config keys to values)")
    block: str = key("`serial`: only q/k/v fold; `parallel`: the FFN, its norm and the skip connection fold too",
                     choices=BLOCKS)
    sizes: Sizes = key("where config.json gives the sizes")
    tie_word_embeddings: FlagValue | None = key("whether the LM head reuses the embedding; absent: config.json's "
                                                "`tie_word_embeddings`, else false", None)
    embedding: EmbeddingDef = key("the token embedding")
    attn_norm: NormDef | None = key("the norm in front of the attention; absent when the attention reads the residual "
                                 "stream itself (OLMo 2, EXAONE 4)", None)
    projections: tuple[ProjectionDef, ...] = key("q, k and v, or one fused qkv, or mla_q and mla_kv, or one "
                                              "mixer_in",
                                              form="a non-empty list of projections")
    qk_norm: QkNorm | None = key("norms applied to the q and k outputs before RoPE", None)
    attention_module: str = key("layer 0's attention module (for a mixer other than attention, the mixer module): "
                                "after it runs, the looked-up rows are released")
    ffn: FfnDef | None = key("layer 0's FFN (required for a parallel block)", None)
    dense_layers: DenseLayersDef | None = key("which layers of a mixture of experts have a dense FFN", None)
    variants: tuple[Variant, ...] = key("patches applied when config.json matches", ())
    refuse: tuple[Refusal, ...] = key("configs refused, with the reason", ())

    def check(self, fail: Fail, where: str) -> None:
        """The rules that relate sections."""
        norms = [("embedding.norm", self.embedding.norm), ("attn_norm", self.attn_norm)]
        if isinstance(self.ffn and self.ffn.norm, NormDef):
            norms.append(("ffn.norm", self.ffn.norm))
        if self.qk_norm is not None and self.qk_norm.over != "head":
            norms += [("qk_norm.q", self.qk_norm.q), ("qk_norm.k", self.qk_norm.k)]
        for i, p in enumerate(self.projections):
            norms += [(f"projections[{i}].low_rank.norm", p.low_rank and p.low_rank.norm),
                      (f"projections[{i}].out_norm", p.out_norm)]
        for at, norm in norms:
            for k in ("weight", "bias"):
                if norm is not None and HEAD in (getattr(norm, k) or ""):
                    raise fail(f"{at}.{k}", f"holds {HEAD}, which only a per-head q/k norm may use")
        if sorted(p.role for p in self.projections) not in ROLE_SETS:
            raise fail("projections", "must hold q, k and v, or one fused qkv, or mla_q and mla_kv (latent "
                                      "attention), or one mixer_in (a sequence mixer other than attention)")
        if self.block == "parallel" and self.ffn is None:
            raise fail("ffn", "is missing (a parallel block folds layer 0's FFN into the table)")
