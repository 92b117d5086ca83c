"""The table's column layout and which source tensors it makes unnecessary.

One place decides what a row holds and what disappears, so that the writer, the
manifest, the loader and `plan` cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from precompile.profiles.model_spec import ModelSpec, Projection

if TYPE_CHECKING:  # the loader imports torch; `plan` on a config reads projection widths without it
    from precompile.loader import TableColumn

TABLE_FILE = "precompile_table.safetensors"
GUARD_SHAPE = (1,)
GUARD_NOTE = ("{guard} here is a 1-element guard, not a weight: its shape makes plain transformers stop instead of "
              "loading this directory as the original model with random layer-0 weights; load it with "
              "precompile.load or from_pretrained(..., trust_remote_code=True)")


@dataclass(frozen=True)
class TableLayout:
    columns: tuple[TableColumn, ...]
    vocab_size: int
    x_in_table: bool
    keep_embedding: bool
    eliminated: tuple[str, ...]
    tensor_name: str
    guard: str  # an eliminated layer-0 weight's name, stored as 1 element in the table file (see GUARD_NOTE)
    x_scale: float | None = None  # x not in the table: the kept embedding row times this (the module's scale)

    @property
    def width(self) -> int:
        return self.columns[-1].stop


def projection_width(spec: ModelSpec, role: str | Projection) -> int:
    """Output width of a projection: its own `width` (a Projection given), or by role from the real head sizes."""
    if isinstance(role, Projection):
        if role.width is not None:
            return role.width
        role = role.role
    return {"q": spec.q_width, "k": spec.kv_width, "v": spec.kv_width,
            "qkv": spec.q_width + 2 * spec.kv_width}[role]


def layer0_tensor_names(spec: ModelSpec, present: set[str] | frozenset[str]) -> list[str]:
    """Layer 0's tensors that the table is computed from, besides the embedding: what conversion reads and
    (those present) what it eliminates, in that order. A projection or FFN bias the checkpoint lacks is
    skipped; any other missing tensor is kept in the list, for the checks to name."""
    names: list[str] = [n for role in spec.qk_norms for n in spec.qk_norm_tensors(role)]

    def add(refs: list[tuple[str, str | None]]) -> None:
        for weight, bias in refs:
            names.append(weight)
            if bias and bias in present:
                names.append(bias)

    norms = [spec.embedding_norm, spec.attn_norm, *(n for p in spec.projections for n in p.extra_norms)]
    if spec.folds_ffn and spec.ffn is not None:
        add(spec.ffn.refs())
        norms.append(spec.ffn.norm)
    names += [t for n in norms if n is not None for t in (n.weight, n.bias) if t]
    add([r for p in spec.projections
         for r in ((p.weight, p.bias), *([(p.low_rank.weight, p.low_rank.bias)] if p.low_rank else []))])
    return list(dict.fromkeys(names))


def table_inputs(spec: ModelSpec, present: set[str] | frozenset[str]) -> list[str]:
    """Every tensor computing the table reads: the embedding, then layer 0's (see layer0_tensor_names)."""
    return [spec.embedding_tensor, *layer0_tensor_names(spec, present)]


def table_layout(spec: ModelSpec, present: set[str] | frozenset[str]) -> TableLayout:
    """Columns of the table and the eliminated tensors, given which tensor names the checkpoint holds.

    x leaves the table when it is the stored row of an embedding that stays for a tied LM head, or that
    row times the scale the embedding module applies (the profile's `embedding.scale`, Gemma's sqrt(d)):
    the loader then computes it from the kept row as the module does, and no value is stored twice.
    """
    from precompile.loader import TableColumn

    keep_embedding = spec.tied
    x_in_table = not (keep_embedding and spec.x_is_scaled_row)
    cols: list[TableColumn] = []
    off = 0
    if x_in_table:
        if spec.folds_ffn:
            name, holds = "x+ffn", "residual: embedding output plus layer 0's FFN of it"
        else:
            name, holds = "x", "residual: the embedding module's output"
        cols.append(TableColumn(name, 0, spec.hidden_size, holds))
        off = spec.hidden_size
    for p in spec.projections:
        w = projection_width(spec, p)
        cols.append(TableColumn(p.role, off, off + w, f"layer-0 {p.role} projection of the normed input", p.module,
                                p.zero_masked))
        off += w
    eliminated = ([] if keep_embedding else [spec.embedding_tensor]) + layer0_tensor_names(spec, present)
    seen = tuple(dict.fromkeys(n for n in eliminated if n in present))
    return TableLayout(columns=tuple(cols), vocab_size=spec.vocab_size, x_in_table=x_in_table,
                       keep_embedding=keep_embedding, eliminated=seen,
                       tensor_name=f"{spec.embedding_module}.table", guard=spec.projections[0].weight,
                       x_scale=None if x_in_table else spec.embedding_scale)


def table_file_header(lay: TableLayout, dtype: str, itemsize: int) -> tuple[list[tuple[str, str, tuple[int, ...], int]],
                                                                           dict[str, str]]:
    """The table file's tensors (name, dtype, shape, nbytes) in order, and its metadata.

    OUT_DIR's config.json carries the original model type, so that AutoTokenizer and AutoConfig work
    without trust_remote_code. The guard keeps plain AutoModelForCausalLM from then loading the original
    class with layer 0 missing: it stops on the guard's shape (transformers refuses mismatched sizes).
    """
    shape = (lay.vocab_size, lay.width)
    return ([(lay.tensor_name, dtype, shape, shape[0] * shape[1] * itemsize),
             (lay.guard, dtype, GUARD_SHAPE, GUARD_SHAPE[0] * itemsize)],
            {"format": "pt", "precompile": GUARD_NOTE.format(guard=lay.guard)})
