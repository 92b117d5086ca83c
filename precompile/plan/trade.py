"""The trade `precompile plan` reports: what precomputing layer 0 buys a model, in the paper's terms, and the
verdict on it (the report itself, from a SOURCE to its table, is `precompile.plan.plan_report`).

The paper's accounting (arXiv 2402.13388, section 2) needs only config.json: the sizes
of layer 0 and the whole model. When the weights are local a second, exact column comes
from the real tensors (biases, norm weights, tied embeddings, real dtypes, the table's
real size), taken from the same `plan_conversion()` that `convert` runs, so the two
cannot disagree.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from precompile.errors import UserError
from precompile.plan.table_layout import projection_width
from precompile.profiles.model_spec import ModelSpec, Projection

if TYPE_CHECKING:  # convert imports torch and transformers: plans from a config need neither
    from precompile.plan.conversion_plan import ConversionPlan

DEFAULT_BATCH_SIZES = (1, 16, 256, 1024)
MANIFEST = "precompile.json"  # Copied from precompile.loader.MANIFEST (which imports torch)


@dataclass(frozen=True)
class Sizes:
    """The sizes the paper's formulas need, with the real head widths."""

    block: str  # serial | parallel
    attention: str  # MHA | MQA | GQA
    d: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    q_width: int
    e: int  # width of k and of v
    n_layers: int
    ffn_kind: str  # mlp | glu
    ffn_hidden: int
    n_experts: int
    vocab_size: int
    # the table's projection part and the projection weights it replaces: q_w + 2e and d*q_w + 2*d*e for q/k/v;
    # the profile's own widths (and low-rank inputs) for latent attention and other sequence mixers
    row_width: int = 0
    projection_weights: int = 0
    router: bool = False  # a mixture of experts with a router (d x n_experts) in the FFN
    shared_ffn_hidden: int = 0  # the width of the shared expert every token takes (0: none)
    tied: bool = False  # the LM head is the embedding: counted once, and kept beside the table
    x_in_table: bool = True  # the table holds x (False: x is read, or recomputed, from the kept tied embedding)
    dense_layers: int = 0  # layers of a mixture of experts whose FFN is a dense GLU (the profile's dense_layers)
    dense_ffn_hidden: int = 0  # their FFN's hidden width
    layer0_dense: bool = False  # layer 0 is one of them

    @property
    def ffn_weights(self) -> int:
        """One layer's FFN: MLP 2*d*hidden, GLU 3*d*hidden, times the experts; plus a router and a shared expert."""
        mats = 3 if self.ffn_kind == "glu" else 2
        router = self.d * self.n_experts if self.router else 0
        return mats * self.d * (self.ffn_hidden * self.n_experts + self.shared_ffn_hidden) + router

    @property
    def dense_ffn_weights(self) -> int:
        """One dense layer's FFN of a mixture of experts: a GLU, 3*d*hidden."""
        return 3 * self.d * self.dense_ffn_hidden

    @property
    def layer0_ffn_weights(self) -> int:
        return self.dense_ffn_weights if self.layer0_dense else self.ffn_weights


def sizes_from_spec(spec: ModelSpec) -> Sizes:
    """Sizes of a resolved profile; the FFN width is needed for the whole-model count (and for a parallel block's
    eliminated FFN), except for a mixer layer (Mamba's) that has no FFN."""
    roles = {p.role for p in spec.projections}
    if not spec.intermediate_size and (spec.block == "parallel" or roles != {"mixer_in"}):
        raise UserError(f"config.json gives no FFN hidden size (intermediate_size) for profile {spec.profile}; "
                        f"add it to config.json or pass a --profile whose sizes name the key")
    ffn = spec.ffn
    moe = ffn is not None and ffn.kind == "moe"
    ffn_kind = ffn.experts[0].kind if moe else spec.ffn_kind
    if moe and ffn.shared is not None and not spec.shared_intermediate_size:
        raise UserError(f"profile {spec.profile} folds a shared expert but its sizes give no "
                        f"shared_intermediate_size; name the config.json key (or an expression) in the profile")
    return Sizes(block=spec.block, attention=spec.attention_kind, d=spec.hidden_size, n_heads=spec.num_heads,
                 n_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, q_width=spec.q_width, e=spec.kv_width,
                 n_layers=spec.n_layers, ffn_kind=ffn_kind, ffn_hidden=spec.intermediate_size or 0,
                 n_experts=spec.n_experts, vocab_size=spec.vocab_size,
                 row_width=sum(projection_width(spec, p) for p in spec.projections),
                 projection_weights=sum(projection_weights(spec, p) for p in spec.projections),
                 router=moe, shared_ffn_hidden=(spec.shared_intermediate_size or 0) if moe and ffn.shared else 0,
                 tied=spec.tied, x_in_table=not (spec.tied and spec.x_is_scaled_row),  # as layout.table_layout
                 dense_layers=len(spec.dense_layers), dense_ffn_hidden=spec.dense_intermediate_size or 0,
                 layer0_dense=0 in spec.dense_layers)


def projection_weights(spec: ModelSpec, p: Projection) -> int:
    """The weights of one layer-0 projection (with its low-rank input): what the table's column replaces."""
    w = projection_width(spec, p)
    lr = p.low_rank
    return spec.hidden_size * lr.rank + lr.rank * w if lr else spec.hidden_size * w


# --- the paper's formulas (pure) -------------------------------------------------------------------------------

def eliminated_weights(s: Sizes) -> int:
    """Layer-0 weights no longer read: Q d*q_w, K and V 2*d*e (or the profile's projections), plus the FFN for a
    parallel block."""
    return s.projection_weights + (s.layer0_ffn_weights if s.block == "parallel" else 0)


def reads_with_per_token(s: Sizes) -> int:
    """One table row: x (or x + FFN), q, k, v (or the profile's projection outputs)."""
    return s.d + s.row_width


def reads(s: Sizes, batch: int) -> tuple[int, int]:
    """Layer-0 reads for a batch of B tokens: (without, with) precompute; weights are read once per batch."""
    return batch * s.d + eliminated_weights(s), batch * reads_with_per_token(s)


def total_weights(s: Sizes) -> int:
    """The paper's whole-model count: per layer Q, O, K, V and FFN, plus embedding and LM head (one matrix when
    tied: a tied head is counted once)."""
    # the output projection as wide as q (the paper's O); latent attention and other mixers: their layer-0
    # projections twice (the output side, MLA's kv_b_proj, is taken as large as the input side)
    standard = s.projection_weights == s.d * s.q_width + 2 * s.d * s.e
    attention = (s.d * s.q_width if standard else s.projection_weights) + s.projection_weights
    # a mixture of experts' dense layers (dense_layers) take a dense GLU instead of the experts
    ffn = (s.n_layers - s.dense_layers) * s.ffn_weights + s.dense_layers * s.dense_ffn_weights
    return s.n_layers * attention + ffn + (1 if s.tied else 2) * s.d * s.vocab_size


def memory(s: Sizes) -> tuple[int, int]:
    """(increase, decrease): the table adds q, k, v per vocabulary entry (and x too when it is in the table beside
    an embedding kept for a tied head; untied, x takes the embedding's place), layer 0 loses its eliminated
    weights."""
    x = s.d if s.tied and s.x_in_table else 0
    return (s.row_width + x) * s.vocab_size, eliminated_weights(s)


def per_token_weights(s: Sizes) -> int:
    """Weights one token reads at batch 1 without precompute: every layer and the LM head once, one embedding row."""
    return total_weights(s) - (0 if s.tied else s.d * s.vocab_size) + s.d


def batch1_share_saved(s: Sizes) -> float:
    """Share of a token's weight reads saved at batch 1: a token reads every layer and the LM head once,
    but only one embedding row."""
    without, with_ = reads(s, 1)
    return (without - with_) / per_token_weights(s)


def break_even_batch(eliminated: float, extra_per_token: float) -> float | None:
    """The batch size at which precompute's saving reaches zero: B* = E / w (layer 0 reads B*d + E without and
    B*(d + w) with; None when the table adds nothing per token)."""
    return eliminated / extra_per_token if extra_per_token > 0 else None


# --- the verdict (README "Is it worth it?") ---------------------------------------------------------------------

MIN_SAVING = 0.01  # worth it needs at least 1% of one token's weight reads saved at batch 1
MAX_MEMORY_PER_SAVING = 10  # ... for at most 10% more memory per 1% of reads saved
RULE = (f"worth it when reads fall by >= {MIN_SAVING:.0%} and memory grows by <= {MAX_MEMORY_PER_SAVING}x that "
        f"share, marginal when the memory bound holds but reads fall by less than {MIN_SAVING:.0%}, else not worth it")


def judge(saved: float, memory_relative: float) -> str:
    """"worth it", "marginal" or "not worth it" for memory-bound decoding at batch 1 (see RULE)."""
    if saved <= 0:
        return "not worth it"
    if memory_relative > MAX_MEMORY_PER_SAVING * saved:
        return "not worth it"
    return "worth it" if saved >= MIN_SAVING else "marginal"


def trade(reads_without: int, reads_with: int, eliminated: int, extra_per_token: int, memory_before: int,
          memory_after: int, unit: str, basis: str) -> dict[str, Any]:
    """The whole-model headline: the share of one token's weight reads saved at batch 1, the break-even batch,
    the memory change of the converted model, and the verdict with its rule. Both sides in the same unit."""
    saved = (reads_without - reads_with) / reads_without
    delta = memory_after - memory_before
    relative = delta / memory_before
    return {"verdict": judge(saved, relative), "basis": basis, "unit": unit,
            "reads_per_token_without": reads_without, "reads_per_token_with": reads_with,
            "reads_saved_batch1": saved, "break_even_batch": break_even_batch(eliminated, extra_per_token),
            "memory_before": memory_before, "memory_after": memory_after, "memory_delta": delta,
            "memory_delta_relative": relative, "rule": RULE}


def paper_trade(s: Sizes) -> dict[str, Any]:
    """The headline from config.json alone, in weights (the same dtype on both sides)."""
    inc, dec = memory(s)
    without, with_ = reads(s, 1)
    per_token = per_token_weights(s)
    total = total_weights(s)
    return trade(per_token, per_token - (without - with_), eliminated_weights(s), s.row_width, total,
                 total + inc - dec, "weights", "weights counted from config.json (the paper's formulas)")


def verdict_line(v: dict[str, Any]) -> str:
    """One plain sentence: the verdict, the figures it rests on and the rule that produced it."""
    unit = "B" if v["unit"] == "bytes" else "weights"
    b = v["break_even_batch"]
    past = f"the saving reaches zero at batch {b:,.0f}" if b is not None else "no break-even batch"
    return (f"verdict: {v['verdict']} for memory-bound decoding at batch 1: {v['reads_saved_batch1'] * 100:.2f}% "
            f"fewer weight reads per token ({past}) for {v['memory_delta_relative'] * 100:+.1f}% memory "
            f"({v['memory_delta']:+,} {unit}); rule: {v['rule']}.")


def figures(s: Sizes, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES) -> dict[str, Any]:
    """Every figure of the paper's table for one model, as JSON-ready values (integers exact)."""
    inc, dec = memory(s)
    total = total_weights(s)
    batches = []
    for b in batch_sizes:
        without, with_ = reads(s, b)
        batches.append({"batch": b, "reads_without": without, "reads_with": with_, "reduction": without / with_})
    return {
        **asdict(s),
        "eliminated_weights": eliminated_weights(s),
        "eliminated": {"projections": s.projection_weights, "q": s.d * s.q_width, "k": s.d * s.e, "v": s.d * s.e,
                       "ffn": s.layer0_ffn_weights if s.block == "parallel" else 0},
        "reads_with_per_token": reads_with_per_token(s),
        "batches": batches,
        "memory_increase": inc,
        "memory_decrease": dec,
        "memory_delta": inc - dec,
        "total_weights": total,
        "memory_delta_relative": (inc - dec) / total,
        "ceiling": 1 / s.n_layers,
        "batch1_reads_saved": batch1_share_saved(s),
        "break_even_batch": break_even_batch(eliminated_weights(s), s.row_width),
        "paper_verdict": paper_trade(s),
    }


# --- exact figures from the real tensors -----------------------------------------------------------------------

def output_files(conv: ConversionPlan) -> dict[str, int]:
    """The exact size in bytes of every weight file a conversion writes (headers included)."""
    from precompile.plan.table_layout import TABLE_FILE, table_file_header
    from precompile.io.safetensors_files import DTYPE_NAMES, element_size, output_dtype, write_header

    entries, metadata = table_file_header(conv.layout, DTYPE_NAMES[conv.model_dtype], conv.model_dtype.itemsize)
    files = {TABLE_FILE: write_header(io.BytesIO(), entries, metadata) + sum(e[3] for e in entries)}
    out_dtype = DTYPE_NAMES[conv.model_dtype]
    for sh in conv.shards:
        if sh.out_file is None:
            continue
        if sh.action == "share":
            files[sh.out_file] = (conv.checkpoint.root / sh.source_file).stat().st_size
            continue
        entries = []
        for t in sorted(sh.keep, key=lambda t: t.start):
            dt = output_dtype(t.dtype, out_dtype)
            entries.append((t.name, dt, t.shape, t.numel * element_size(dt)))
        data = sum(e[3] for e in entries)
        files[sh.out_file] = write_header(io.BytesIO(), entries, conv.checkpoint.metadata[sh.source_file]) + data
    return files


def exact_figures(conv: ConversionPlan, batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES) -> dict[str, Any]:
    """Byte figures of a planned conversion (`convert.plan_conversion`): what the files really hold.

    Like with like: every read and memory figure is in the output dtype, the source's tensors converted to it
    as `convert` converts them (`source_weight_bytes` states the source as stored, too).
    """
    from precompile.io.safetensors_files import DTYPE_NAMES, dtype_name, element_size, output_dtype

    spec, lay, ckpt = conv.spec, conv.layout, conv.checkpoint
    es = conv.model_dtype.itemsize

    def out_bytes(t) -> int:
        return t.numel * element_size(output_dtype(t.dtype, DTYPE_NAMES[conv.model_dtype]))

    gone = [ckpt.info(n) for n in lay.eliminated]
    layer0 = [t for t in gone if t.name != spec.embedding_tensor]
    emb = ckpt.info(spec.embedding_tensor)
    emb_row = spec.hidden_size * (out_bytes(emb) // max(emb.numel, 1))
    row_with = lay.width * es + (0 if lay.x_in_table else emb_row)
    layer0_bytes = sum(out_bytes(t) for t in layer0)
    source_bytes = sum(t.nbytes for t in ckpt.tensors.values())
    source_out = sum(out_bytes(t) for t in ckpt.tensors.values())
    kept = [t for t in ckpt.tensors.values() if t.name not in set(lay.eliminated)]
    output_bytes = conv.table_file_bytes + sum(out_bytes(t) for t in kept)
    # one token at batch 1 reads every weight once (a tied embedding once, for the head) but one embedding row
    per_token = source_out - (0 if spec.tied else out_bytes(emb)) + emb_row
    batches = []
    for b in batch_sizes:
        without, with_ = b * emb_row + layer0_bytes, b * row_with
        batches.append({"batch": b, "reads_without_bytes": without, "reads_with_bytes": with_,
                        "reduction": without / with_})
    headline = trade(per_token, per_token - layer0_bytes - emb_row + row_with, layer0_bytes, row_with - emb_row,
                     source_out, output_bytes, "bytes", f"exact bytes in {dtype_name(conv.model_dtype)}")
    return {
        "dtype": dtype_name(conv.model_dtype),
        "tied": spec.tied,
        "embedding_kept": lay.keep_embedding,
        "x_in_table": lay.x_in_table,
        "x_scale": lay.x_scale,
        "table_shape": [lay.vocab_size, lay.width],
        "table_bytes": conv.table_bytes,
        "eliminated_tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes}
                               for t in gone],
        "eliminated_weights": sum(t.numel for t in gone),
        "eliminated_bytes": sum(out_bytes(t) for t in gone),
        "layer0_eliminated_weights": sum(t.numel for t in layer0),
        "layer0_eliminated_bytes": layer0_bytes,
        "reads_with_per_token_bytes": row_with,
        "batches": batches,
        "source_weight_bytes": source_bytes,
        "source_weight_bytes_in_output_dtype": source_out,
        "output_weight_bytes": output_bytes,
        "memory_delta_bytes": output_bytes - source_out,
        "memory_delta_relative": (output_bytes - source_out) / source_out,
        "files": output_files(conv),
        "verdict": headline,
    }
