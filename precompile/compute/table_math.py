"""The math: table rows as pure functions of embedding rows and layer-0 weights.

Everything per token that precedes the attention folds into the table: an
embedding scale or norm, layer 0's input norm, the q/k/v projections with their
biases and, for parallel blocks, the FFN with its norm. This module never
imports transformers; tests compare it against transformers itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from precompile.plan.table_layout import TableLayout
from precompile.profiles.model_spec import Expert, Ffn, ModelSpec, Norm, Projection, expand_heads
from precompile.profiles.sections import HEAD


def apply_norm(norm: Norm, x: torch.Tensor, w: dict[str, torch.Tensor], inplace: bool = False) -> torch.Tensor:
    """RMSNorm or LayerNorm in x's dtype; weight used as (offset + w) for Gemma-style norms.

    `inplace` normalises x itself (a view into a larger result: a q/k norm over its projection's columns):
    the same operations on the same values, without a result of x's size to copy back.
    """
    if norm.kind == "rms":
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        y = x.mul_(inv) if inplace else x * inv
    else:
        y = F.layer_norm(x, (x.shape[-1],), eps=norm.eps)
        y = x.copy_(y) if inplace else y
    # in place on y (new, or x when `inplace`): the same values without another pass-sized temporary
    if norm.weight:
        y.mul_(w[norm.weight] + norm.offset)
    if norm.bias:
        y.add_(w[norm.bias])
    return y


def activation(name: str, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The FFN's activation; `inplace` overwrites x (the same kernel, without a new tensor)."""
    if name == "silu":
        return F.silu(x, inplace=inplace)
    if name in ("gelu", "gelu_tanh"):
        approximate = "tanh" if name == "gelu_tanh" else "none"
        return torch.ops.aten.gelu_(x, approximate=approximate) if inplace else F.gelu(x, approximate=approximate)
    if name == "relu":
        return F.relu(x, inplace=inplace)
    if name == "relu2":  # squared ReLU (Nemotron, Persimmon, Arcee)
        return F.relu(x, inplace=inplace).square_() if inplace else F.relu(x).square()
    raise ValueError(f"unknown activation {name}")


class Scratch:
    """Buffers that a blocked FFN reuses from block to block.

    A new tensor of tens of MiB costs a page fault for every page it touches first, so casting a
    block of weights into a new tensor takes several times as long as into a used one. Each role
    keeps one buffer, grown when a larger shape asks for it; a tensor handed out is valid until the
    next `take` of the same role.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[role] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def cast(self, role: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t in dtype: t itself when it has it already, else a copy in the role's buffer."""
        return t if t.dtype == dtype else self.take(role, tuple(t.shape), dtype, t.device).copy_(t)

    def linear(self, role: str, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(h, weight, bias) into the role's buffer, by the kernel F.linear uses (addmm, or mm)."""
        flat = h.reshape(-1, h.shape[-1])
        out = self.take(role, (flat.shape[0], weight.shape[0]), h.dtype, h.device)
        if bias is None:
            torch.mm(flat, weight.t(), out=out)
        else:
            torch.addmm(bias, flat, weight.t(), out=out)
        return out.view(*h.shape[:-1], weight.shape[0])


def _linear(h: torch.Tensor, w: dict[str, torch.Tensor], ref: tuple[str, str | None]) -> torch.Tensor:
    weight, bias = ref
    return F.linear(h, w[weight], w[bias] if bias and bias in w else None)


def expert_output(expert: Expert, act: str, h: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One dense FFN: an MLP down(act(up h)) or a GLU down(act(gate h) * up h)."""
    up = _linear(h, w, expert.up)
    inner = activation(act, _linear(h, w, expert.gate)) * up if expert.kind == "glu" else activation(act, up)
    return _linear(inner, w, expert.down)


def ffn_output(ffn: Ffn, h: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The FFN of normed input h: dense, or a top-k mixture of experts weighted by the router's softmax."""
    if ffn.kind != "moe":
        return expert_output(Expert(ffn.kind, ffn.up, ffn.gate, ffn.down), ffn.activation, h, w)
    flat = h.reshape(-1, h.shape[-1])
    top_w, top_i = route(ffn, flat, w)
    out = torch.zeros_like(flat)
    for e, expert in enumerate(ffn.experts):
        tok, slot = (top_i == e).nonzero(as_tuple=True)
        if tok.numel():
            y = expert_output(expert, ffn.activation, flat[tok], w) * top_w[tok, slot, None].to(flat.dtype)
            out.index_add_(0, tok, y)
    if ffn.shared is not None:  # a dense expert every token takes, added or averaged (Cohere 2 MoE)
        out += expert_output(ffn.shared, ffn.activation, flat, w)
        if ffn.shared_combine == "average":
            out /= 2
    return out.reshape(h.shape)


def route(ffn: Ffn, flat: torch.Tensor, w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's top-k experts per token and their weights: softmax (in float32 or wider) over all
    experts, renormalised over the picked ones when `normalize_topk` (the same as a softmax over the top-k
    logits)."""
    logits = _linear(flat, w, ffn.router)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top_w, top_i = probs.topk(ffn.top_k, dim=-1)
    if ffn.normalize_topk:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return top_w, top_i


def qk_norm_weights(norm: Norm, heads: int, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """w, with a norm stored one tensor per head ({h} in its names) stacked into [heads, head_dim]."""
    stacked = {t: torch.stack([w[n] for n in expand_heads(t, heads)]) for t in (norm.weight, norm.bias)
               if t and HEAD in t}
    return {**w, **stacked} if stacked else w


def qk_normed(spec: ModelSpec, role: str, y: torch.Tensor, w: dict[str, torch.Tensor],
              inplace: bool = False) -> torch.Tensor:
    """A q/k norm after the projection: over each head (weight [head_dim], [heads, head_dim] or one tensor per
    head) or, with `over: projection`, over the projection's whole output. `inplace`: in y's memory where
    its heads are a view of it (see apply_norm)."""
    norm = spec.qk_norms[role]
    if spec.qk_norm_span == "projection":
        return apply_norm(norm, y, w, inplace)
    heads = y.reshape(*y.shape[:-1], -1, spec.head_dim)
    return apply_norm(norm, heads, qk_norm_weights(norm, spec.qk_norm_heads(role), w), inplace).reshape(y.shape)


def normed_parts(spec: ModelSpec, p: Projection, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """role -> a view of the values of projection output y that the role's q/k norm acts on.

    A fused qkv holds q and k as [q | k | v] along its output or, with `heads_interleaved`, per head as
    [heads, (q, k, v), head_dim] (Persimmon): then the views are [..., heads, head_dim], not contiguous.
    """
    if p.role != "qkv" or not spec.qk_norms:
        return {p.role: y} if p.role in spec.qk_norms else {}
    if p.heads_interleaved:
        per_head = y.view(*y.shape[:-1], spec.num_heads, 3, spec.head_dim)
        return {r: per_head[..., i, :] for i, r in enumerate("qk") if r in spec.qk_norms}
    qw, kw = spec.q_width, spec.kv_width
    return {r: v for r, v in (("q", y[..., :qw]), ("k", y[..., qw:qw + kw])) if r in spec.qk_norms}


def projection_output(spec: ModelSpec, p: Projection, h: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """Layer 0's projection of normed input h: through its low-rank projection and norm first, if any, and
    with the norms that follow it (over its leading outputs; q/k norms)."""
    if p.low_rank is not None:
        h = _linear(h, w, (p.low_rank.weight, p.low_rank.bias))
        h = h if p.low_rank.norm is None else apply_norm(p.low_rank.norm, h, w)
    return finish_projection(spec, p, _linear(h, w, (p.weight, p.bias)), w)


def finish_projection(spec: ModelSpec, p: Projection, y: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """Projection output y after the norms that follow the linear map, in place."""
    if p.out_norm is not None:
        apply_norm(p.out_norm, y[..., :p.out_norm_width], w, inplace=True)
    for role, part in normed_parts(spec, p, y).items():
        normed = qk_normed(spec, role, part.reshape(*y.shape[:-1], -1), w, inplace=True)
        if normed.untyped_storage().data_ptr() != part.untyped_storage().data_ptr():  # reshape had to copy
            part.copy_(normed.view(part.shape))
    return y


def embedding_output(spec: ModelSpec, rows: torch.Tensor, model_dtype: torch.dtype,
                     w: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> torch.Tensor:
    """x as the embedding module (and a norm right after it) returns it, in the model dtype."""
    x = rows.to(model_dtype)
    if spec.embedding_scale is not None:  # the scale is rounded to the model dtype, as transformers does
        x = x * torch.tensor(spec.embedding_scale, dtype=model_dtype, device=x.device)
    if spec.embedding_norm is not None:
        x = apply_norm(spec.embedding_norm, x.to(compute_dtype), w).to(model_dtype)
    return x


def layer_input(spec: ModelSpec, x_model: torch.Tensor) -> torch.Tensor:
    """Layer 0's input: the embedding module's output times the model's `embedding.multiplier`, if any.

    As transformers' `inputs_embeds * multiplier` with a Python float: computed in float32 (the opmath of
    bfloat16/float16/float32), rounded once to the model dtype.
    """
    if spec.embedding_multiplier is None:
        return x_model
    wide = torch.float64 if x_model.dtype == torch.float64 else torch.float32
    return (x_model.to(wide) * spec.embedding_multiplier).to(x_model.dtype)


def folded_ffn(spec: ModelSpec, x: torch.Tensor, h: torch.Tensor, w: dict[str, torch.Tensor],
               block: int | None = None) -> torch.Tensor:
    """x + FFN(norm(x)) of a parallel block, in x's dtype.

    The FFN weights may be stored in another dtype (e.g. bfloat16 views of a memory-mapped file):
    they are cast `block` hidden units at a time, so the compute-dtype copy of a large FFN never
    exists whole. One block (the default) is exactly the unblocked computation. The blocks share
    their casts' and intermediates' buffers and the activation runs in place, so a chunk allocates a
    few tensors here, not one per cast and result.
    """
    ffn = spec.ffn
    h2 = h if ffn.norm is None else apply_norm(ffn.norm, x, w)
    if ffn.kind == "moe":  # experts are small next to a dense FFN: cast them whole
        names = {n for ref in ffn.refs() for n in ref if n and n in w}
        return x + ffn_output(ffn, h2, {**w, **{n: w[n].to(x.dtype) for n in names}})
    scratch = Scratch()
    hidden = w[ffn.up[0]].shape[0]
    block = hidden if not block or block >= hidden else block

    def bias(ref: tuple[str, str | None], s: slice = slice(None)) -> torch.Tensor | None:
        return w[ref[1]][s].to(x.dtype) if ref[1] and ref[1] in w else None

    def inner(s: slice) -> torch.Tensor:
        """act(up h2), or act(gate h2) * up h2, for hidden units s."""
        up = scratch.linear("up out", h2, scratch.cast("up", w[ffn.up[0]][s], x.dtype), bias(ffn.up, s))
        if ffn.kind != "glu":
            return activation(ffn.activation, up, inplace=True)
        gate = scratch.linear("gate out", h2, scratch.cast("gate", w[ffn.gate[0]][s], x.dtype), bias(ffn.gate, s))
        return activation(ffn.activation, gate, inplace=True).mul_(up)

    down_w = w[ffn.down[0]]
    if block == hidden:  # one block: the same operations as the unblocked formula
        return scratch.linear("down out", inner(slice(None)), scratch.cast("down", down_w, x.dtype),
                              bias(ffn.down)).add_(x)
    acc = scratch.take("acc", tuple(x.shape), x.dtype, x.device).copy_(x)
    for start in range(0, hidden, block):
        s = slice(start, min(hidden, start + block))
        a = inner(s)
        down = scratch.cast("down", down_w[:, s], x.dtype)
        if acc.dim() == 2:
            acc.addmm_(a, down.t())
        else:
            acc.add_(a @ down.t())
    b = bias(ffn.down)
    return acc if b is None else acc.add_(b)


def compute_rows(spec: ModelSpec, layout: TableLayout, rows: torch.Tensor, w: dict[str, torch.Tensor],
                 model_dtype: torch.dtype, compute_dtype: torch.dtype, out: torch.Tensor | None = None,
                 ffn_block: int | None = None) -> torch.Tensor:
    """Table rows for a chunk of embedding rows, in the compute dtype (or written into `out`).

    `w` holds layer 0's tensors on rows' device, cast to the compute dtype (the FFN weights of a
    parallel block may stay in their stored dtype; see `folded_ffn`). With `out` ([rows, width], any
    dtype) each column group is cast straight into its slice, so no full-width compute-dtype copy
    is made; the values are the same as `compute_rows(...).to(out.dtype)`.
    """
    x_model = embedding_output(spec, rows, model_dtype, w, compute_dtype)
    x = layer_input(spec, x_model).to(compute_dtype)
    h = x if spec.attn_norm is None else apply_norm(spec.attn_norm, x, w)
    if out is None:
        out = torch.empty(x.shape[:-1] + (layout.width,), dtype=compute_dtype, device=x.device)
    col = iter(layout.columns)
    if layout.x_in_table:
        c = next(col)
        # a serial block's x is x_model exactly (the compute dtype holds every model-dtype value); copied
        # from the narrower dtype it reads half the bytes
        out[..., c.start:c.stop] = folded_ffn(spec, x, h, w, ffn_block) if spec.folds_ffn else x_model
    cols = dict(zip(spec.projections, col))
    for group in projection_groups(spec, w):
        first, last = cols[group[0]], cols[group[-1]]
        if len(group) == 1:
            out[..., first.start:first.stop] = projection_output(spec, group[0], h, w)
            continue
        # one matmul for the group (the same values as one per projection: each output is its own dot
        # product), each projection's norms on its view of the result, one cast into the group's columns
        y = F.linear(h, *_stacked(group, w))
        for p in group:
            finish_projection(spec, p, y[..., cols[p].start - first.start:cols[p].stop - first.start], w)
        out[..., first.start:last.stop] = y
    return out


def projection_groups(spec: ModelSpec, w: dict[str, torch.Tensor]) -> list[tuple[Projection, ...]]:
    """The projections in table order; consecutive ones that are one linear map of h each (no low-rank step),
    with biases alike, grouped to be computed by one matmul."""
    groups: list[list[Projection]] = []
    for p in spec.projections:
        prev = groups[-1][-1] if groups else None
        if prev is not None and p.low_rank is None and prev.low_rank is None and _bias(prev, w) == _bias(p, w):
            groups[-1].append(p)
        else:
            groups.append([p])
    return [tuple(g) for g in groups]


def _bias(p: Projection, w: dict[str, torch.Tensor]) -> bool:
    return bool(p.bias and p.bias in w)


def _stacked_names(group: tuple[Projection, ...]) -> tuple[str, str]:
    return "+".join(p.weight for p in group), "+".join(str(p.bias) for p in group)


def _stacked(group: tuple[Projection, ...], w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A group's weights (and biases) stacked: those `stack_projections` keeps in w, else stacked now."""
    weight, bias = _stacked_names(group)
    stacked_bias = None
    if _bias(group[0], w):
        stacked_bias = w[bias] if bias in w else torch.cat([w[p.bias] for p in group])
    return (w[weight] if weight in w else torch.cat([w[p.weight] for p in group])), stacked_bias


def stack_projections(spec: ModelSpec, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """w with each projection group's weights (and biases) stacked once, for all chunks; the members become
    views of the stacked tensor, so nothing is held twice."""
    w = dict(w)
    for group in projection_groups(spec, w):
        if len(group) < 2:
            continue
        for name, t, members in zip(_stacked_names(group), _stacked(group, w),
                                    ([p.weight for p in group], [p.bias for p in group])):
            if t is not None:
                w[name] = t
                w.update(zip(members, t.split([w[m].shape[0] for m in members])))
    return w

