"""The table's column layout and which source tensors it makes unnecessary.

One place decides what a row holds and what disappears, so that the writer, the
manifest, the loader and `plan` cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from .profiles import ModelSpec, Projection

TABLE_FILE = "precompile_table.safetensors"
GUARD_NOTE = ("{guard} here is a 1-element guard, not a weight: its shape makes plain transformers stop instead of "
              "loading this directory as the original model with random layer-0 weights; load it with "
              "precompile.load or from_pretrained(..., trust_remote_code=True)")


@dataclass(frozen=True)
class Column:
    name: str  # "x", "x+ffn", or a projection role: "q", "k", "v", "qkv"
    start: int
    stop: int
    holds: str
    module: str | None = None  # the layer-0 module whose output this slice replaces
    zero_masked: bool = False  # the module's input is zero at padded positions: so is the looked-up output

    def as_dict(self) -> dict:
        d = {"name": self.name, "start": self.start, "stop": self.stop, "holds": self.holds}
        if self.module:
            d["module"] = self.module
        if self.zero_masked:
            d["zero_masked"] = True
        return d


@dataclass(frozen=True)
class TableLayout:
    columns: tuple[Column, ...]
    vocab_size: int
    x_in_table: bool
    keep_embedding: bool
    eliminated: tuple[str, ...]
    tensor_name: str
    guard: str  # an eliminated layer-0 weight's name, stored as 1 element in the table file (see GUARD_NOTE)

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


def table_layout(spec: ModelSpec, present: set[str] | frozenset[str]) -> TableLayout:
    """Columns of the table and the eliminated tensors, given which tensor names the checkpoint holds.

    x leaves the table only when it is exactly the stored row of an embedding that stays for a tied
    LM head: then no value is stored twice.
    """
    keep_embedding = spec.tied
    x_in_table = not (keep_embedding and spec.x_is_stored_row)
    cols: list[Column] = []
    off = 0
    if x_in_table:
        if spec.folds_ffn:
            name, holds = "x+ffn", "residual: embedding output plus layer 0's FFN of it"
        else:
            name, holds = "x", "residual: the embedding module's output"
        cols.append(Column(name, 0, spec.hidden_size, holds))
        off = spec.hidden_size
    for p in spec.projections:
        w = projection_width(spec, p)
        cols.append(Column(p.role, off, off + w, f"layer-0 {p.role} projection of the normed input", p.module,
                           p.zero_masked))
        off += w
    eliminated = [] if keep_embedding else [spec.embedding_tensor]
    eliminated += [n for role in spec.qk_norms for n in spec.qk_norm_tensors(role)]
    norms = [spec.embedding_norm, spec.attn_norm, *(n for p in spec.projections for n in p.extra_norms)]
    if spec.folds_ffn and spec.ffn is not None:
        norms.append(spec.ffn.norm)
        for ref in spec.ffn.refs():
            eliminated.extend(n for n in ref if n)
    for norm in norms:
        if norm is not None:
            eliminated.extend(n for n in (norm.weight, norm.bias) if n)
    for p in spec.projections:
        for weight, bias in ((p.weight, p.bias), *([(p.low_rank.weight, p.low_rank.bias)] if p.low_rank else [])):
            eliminated += [weight, *([bias] if bias else [])]
    seen: list[str] = []
    for name in eliminated:
        if name in present and name not in seen:
            seen.append(name)
    return TableLayout(columns=tuple(cols), vocab_size=spec.vocab_size, x_in_table=x_in_table,
                       keep_embedding=keep_embedding, eliminated=tuple(seen),
                       tensor_name=f"{spec.embedding_module}.table", guard=spec.projections[0].weight)


def table_file_header(lay: TableLayout, dtype: str, itemsize: int) -> tuple[list[tuple[str, str, tuple[int, ...], int]],
                                                                           dict[str, str]]:
    """The table file's tensors (name, dtype, shape, nbytes) in order, and its metadata.

    OUT_DIR's config.json carries the original model type, so that AutoTokenizer and AutoConfig work
    without trust_remote_code. The guard keeps plain AutoModelForCausalLM from then loading the original
    class with layer 0 missing: it stops on the guard's shape (transformers refuses mismatched sizes).
    """
    shape = (lay.vocab_size, lay.width)
    return ([(lay.tensor_name, dtype, shape, shape[0] * shape[1] * itemsize), (lay.guard, dtype, (1,), itemsize)],
            {"format": "pt", "precompile": GUARD_NOTE.format(guard=lay.guard)})
