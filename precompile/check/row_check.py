"""Table rows against a float64 recomputation, within a derived rounding bound.

A stored value s is the compute-dtype result t_c rounded to the stored dtype, so
against the exact value t:

    |s - t| <= |s - t_c| + |t_c - t| <= ulp(s)/2 + acc

where acc is the compute dtype's accumulation error. For a dot product of n terms
in unit roundoff u, the probabilistic bound of Higham and Mary (SIAM J. Sci.
Comput. 2019) gives |t_c - t| <= lambda * sqrt(n) * u * sum|terms| with
overwhelming probability for a small lambda; sum|terms| (`M`) is computed here
from absolute values in float64, n covers the norm (d) plus the projection (d),
plus the FFN's inner width when a parallel block folds it in. Any element beyond
that bound fails its row.

The element bound is loose where the table dtype is as fine as the compute dtype
(a float32 table computed in float32: accumulation error is then a few ulp
itself), so each row also has a statistic: the mean over the row of
|s - t| / (ulp(s)/2 + u * sqrt(sum terms^2)). Rounding noise keeps it near 1-3.5
(measured for d = 64..8192); a row shifted by 8 ulp puts it above 5. For
bfloat16/float16 tables the element bound alone catches an 8-ulp change of any
single value, with a margin of 2-3 orders of magnitude.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from precompile.compute.table_math import (
    activation, apply_norm, compute_rows, embedding_output, layer_input, normed_parts, qk_norm_weights, route)
from precompile.plan.table_layout import TableLayout
from precompile.profiles.model_spec import Expert, Ffn, ModelSpec, Norm, Projection

ACT_SLOPE = 1.2  # bound on |act'(x)| for silu, gelu, gelu_tanh and relu (1.1, 1.13, 1.13, 1)


def act_slope(name: str, pre: torch.Tensor) -> torch.Tensor | float:
    """A bound on |act'| at the pre-activation values: ACT_SLOPE, or 2 relu(x) for the squared ReLU."""
    return 2 * pre.clamp_min(0) if name == "relu2" else ACT_SLOPE


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding in dtype."""
    return torch.finfo(dtype).eps / 2


def ulp(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of dtype's numbers at each value of s (s holds values of dtype, in any wider float)."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(s)
    spacing = torch.ldexp(torch.full_like(s, fi.eps), e - 1)
    return torch.clamp_min(spacing, fi.tiny * fi.eps)


def _lin(h: torch.Tensor, w: dict[str, torch.Tensor], ref: tuple[str, str | None], mode: str) -> torch.Tensor:
    weight, bias = ref
    b = w[bias] if bias and bias in w else None
    if mode == "abs":
        return F.linear(h.abs(), w[weight].abs(), None if b is None else b.abs())
    return F.linear(h * h, w[weight] * w[weight], None if b is None else b * b)  # mode "sq"


def magnitudes(spec: ModelSpec, layout: TableLayout, rows: torch.Tensor, w: dict[str, torch.Tensor],
               model_dtype: torch.dtype,
               w32: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per table value: M = sum|terms| and M2 = sqrt(sum terms^2) of its final dot product.

    The values come from float64 (`w`); the magnitudes only scale a bound, so their sums run in
    float32 (`w32`, the same weights), which halves the cost of `--rows all`. For a folded FFN, the
    errors of the inner activations are carried through the down projection to first order
    (|act'| <= act_slope).
    """
    f64 = torch.float64
    w32 = w32 if w32 is not None else {k: v.float() for k, v in w.items()}
    x_model = embedding_output(spec, rows, model_dtype, w, f64)
    x = layer_input(spec, x_model).to(f64)
    h64 = x if spec.attn_norm is None else apply_norm(spec.attn_norm, x, w)
    h = h64.float()
    m, m2 = [], []
    if layout.x_in_table:
        if spec.folds_ffn:
            ffn = spec.ffn
            x32 = x.float()
            h2_64 = h64 if ffn.norm is None else apply_norm(ffn.norm, x, w)
            fm, fm2 = _ffn_magnitudes(ffn, h2_64.float(), w32, h2_64, w)
            m.append(x32.abs() + fm)
            m2.append(torch.sqrt(x32 * x32 + fm2))
        else:
            m.append(x_model.abs().float())
            m2.append(x_model.abs().float())
    for p in spec.projections:
        pm, pm2, y = _projection_magnitudes(p, h, w32)
        for (role, yp), mp, mp2 in zip(normed_parts(spec, p, y).items(), normed_parts(spec, p, pm).values(),
                                       normed_parts(spec, p, pm2).values()):
            flat = (*y.shape[:-1], -1)
            for part, normed in zip((mp, mp2), _qk_normed_magnitudes(spec, role, yp.reshape(flat), mp.reshape(flat),
                                                                     mp2.reshape(flat), w32)):
                part.copy_(normed.view(part.shape))
        m.append(pm)
        m2.append(pm2)
    return torch.cat(m, dim=-1).double(), torch.cat(m2, dim=-1).double()


def _linear_magnitudes(h: torch.Tensor, err: torch.Tensor, err2: torch.Tensor, w32: dict[str, torch.Tensor],
                       ref: tuple[str, str | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear map of input h whose own error scales are err and err2 (zeros: an exact input): its output's
    sum|terms| and sqrt(sum terms^2), and the output."""
    weight, bias = ref
    y = F.linear(h, w32[weight], w32[bias] if bias and bias in w32 else None)
    return _lin(h.abs() + err, w32, ref, "abs"), torch.sqrt(_lin(torch.sqrt(h * h + err2 * err2), w32, ref, "sq")), y


def _norm_gain(norm: Norm, w32: dict[str, torch.Tensor]) -> torch.Tensor:
    return (w32[norm.weight] + norm.offset).abs() if norm.weight else torch.ones((), dtype=torch.float32)


def _projection_magnitudes(p: Projection, h: torch.Tensor,
                           w32: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A projection's sum|terms| and sqrt(sum terms^2), through its low-rank input and norm and the norm over its
    leading outputs (each carried to first order, as the q/k norms are), and its output."""
    zero = torch.zeros_like(h)
    err, err2 = zero, zero
    lr = p.low_rank
    if lr is not None:
        m, m2, a = _linear_magnitudes(h, zero, zero, w32, (lr.weight, lr.bias))
        if lr.norm is not None:
            m, m2 = _normed_magnitudes(lr.norm, a, m, m2, a.shape[-1], _norm_gain(lr.norm, w32))
            a = apply_norm(lr.norm, a, w32)
        h, err, err2 = a, m, m2
    pm, pm2, y = _linear_magnitudes(h, err, err2, w32, (p.weight, p.bias))
    if p.out_norm is not None:
        n = p.out_norm_width
        lead = _normed_magnitudes(p.out_norm, y[..., :n], pm[..., :n], pm2[..., :n], n, _norm_gain(p.out_norm, w32))
        for part, normed in zip((pm, pm2), lead):
            part[..., :n] = normed
    return pm, pm2, y


def _expert_magnitudes(expert: Expert, act: str, h2: torch.Tensor,
                        w32: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum|terms| and sum terms^2 of one dense FFN's down projection, its inner errors carried to first order."""
    up = F.linear(h2, w32[expert.up[0]], w32[expert.up[1]] if expert.up[1] and expert.up[1] in w32 else None)
    mu = _lin(h2, w32, expert.up, "abs")
    if expert.kind == "glu":
        gate = expert.gate
        g = F.linear(h2, w32[gate[0]], w32[gate[1]] if gate[1] and gate[1] in w32 else None)
        a = activation(act, g)
        inner = (a * up).abs() + a.abs() * mu + act_slope(act, g) * up.abs() * _lin(h2, w32, gate, "abs")
    else:
        inner = activation(act, up).abs() + act_slope(act, up) * mu
    return _lin(inner, w32, expert.down, "abs"), _lin(inner, w32, expert.down, "sq")


def _ffn_magnitudes(ffn: Ffn, h2: torch.Tensor, w32: dict[str, torch.Tensor], h64: torch.Tensor,
                    w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A folded FFN's sum|terms| and sum terms^2: dense, or the routed experts' weighted by the router (chosen in
    float64 from h64, as the recomputation chooses them) plus the shared expert."""
    if ffn.kind != "moe":
        return _expert_magnitudes(Expert(ffn.kind, ffn.up, ffn.gate, ffn.down), ffn.activation, h2, w32)
    flat = h2.reshape(-1, h2.shape[-1])
    top_w, top_i = route(ffn, h64.reshape(-1, h64.shape[-1]), w)
    m = torch.zeros_like(flat)
    m2 = torch.zeros_like(flat)
    for e, expert in enumerate(ffn.experts):
        tok, slot = (top_i == e).nonzero(as_tuple=True)
        if tok.numel():
            em, em2 = _expert_magnitudes(expert, ffn.activation, flat[tok], w32)
            weight = top_w[tok, slot, None].float()
            m.index_add_(0, tok, em * weight)
            m2.index_add_(0, tok, em2 * weight * weight)
    if ffn.shared is not None:
        sm, sm2 = _expert_magnitudes(ffn.shared, ffn.activation, flat, w32)
        m, m2 = (m + sm, m2 + sm2) if ffn.shared_combine == "sum" else ((m + sm) / 2, (m2 + sm2) / 4)
    return m.reshape(h2.shape), m2.reshape(h2.shape)


def _qk_normed_magnitudes(spec: ModelSpec, role: str, y: torch.Tensor, m: torch.Tensor, m2: torch.Tensor,
                          w32: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The magnitudes of q or k (projection output y) carried through the role's norm to first order.

    The norm divides each group (a head, or the whole projection) by its spread sigma and scales by |w|:
    an error d in y moves the output by at most |w|/sigma * (|d_i| + |y_hat_i| * mean|d|), the second
    term from sigma's own change.
    """
    norm = spec.qk_norms[role]
    group = y.shape[-1] if spec.qk_norm_span == "projection" else spec.head_dim
    gain = torch.ones((), dtype=y.dtype)
    if norm.weight:
        heads = spec.qk_norm_heads(role) if spec.qk_norm_span == "head" else 1
        gain = (qk_norm_weights(norm, heads, w32)[norm.weight] + norm.offset).abs()
    return _normed_magnitudes(norm, y, m, m2, group, gain)


def _normed_magnitudes(norm: Norm, y: torch.Tensor, m: torch.Tensor, m2: torch.Tensor, group: int,
                       gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The magnitudes m, m2 of y carried through a norm over groups of `group` values with weights `gain` (|w|)."""
    shape = (*y.shape[:-1], -1, group)
    y, m, m2 = y.reshape(shape), m.reshape(shape), m2.reshape(shape)
    if norm.kind == "layer":
        y = y - y.mean(-1, keepdim=True)
    sigma = torch.sqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps)
    y_hat = (y / sigma).abs()
    out = [(gain / sigma * (v + y_hat * v.mean(-1, keepdim=True))).reshape(*v.shape[:-2], -1) for v in (m, m2)]
    return out[0], out[1]


def dot_length(spec: ModelSpec) -> int:
    """Terms accumulated in sequence for one table value: the norm's mean, the projection, a folded FFN."""
    n = 2 * spec.hidden_size + 2 * max((p.low_rank.rank for p in spec.projections if p.low_rank), default=0)
    if spec.folds_ffn and spec.intermediate_size:
        n += 2 * spec.intermediate_size
    return n


@dataclass
class RowStats:
    """Running results over row chunks."""

    checked: int = 0
    failed_ids: list[int] = field(default_factory=list)
    max_ulp: float = 0.0  # largest |s - t| in ulps of the stored value
    max_elem_ratio: float = 0.0  # largest (|s - t| - ulp/2) / accumulation bound; > 1 fails
    max_row_z: float = 0.0  # largest row mean statistic; > row_z fails
    non_finite: int = 0
    seconds: float = 0.0


def compare_rows(spec: ModelSpec, layout: TableLayout, emb_rows: torch.Tensor, stored: torch.Tensor,
                 ids: torch.Tensor, w64: dict[str, torch.Tensor], table_dtype: torch.dtype,
                 compute_dtype: torch.dtype, stats: RowStats, lam: float, row_z: float,
                 w32: dict[str, torch.Tensor] | None = None) -> None:
    """Check one chunk: stored rows (table dtype) against the float64 recomputation from emb_rows."""
    t = compute_rows(spec, layout, emb_rows, w64, table_dtype, torch.float64)
    m, m2 = magnitudes(spec, layout, emb_rows, w64, table_dtype, w32)
    s = stored.to(torch.float64)
    u = unit_roundoff(compute_dtype)
    half = ulp(s, table_dtype) / 2
    err = (s - t).abs()
    acc = lam * math.sqrt(dot_length(spec)) * u * m
    finite = torch.isfinite(s).all(dim=-1)
    elem_bad = (err > half + acc).any(dim=-1)
    z = (err / (half + u * m2)).mean(dim=-1)
    bad = elem_bad | (z > row_z) | ~finite
    stats.checked += int(ids.numel())
    stats.non_finite += int((~finite).sum())
    stats.failed_ids.extend(int(i) for i in ids[bad].tolist())
    ok = torch.isfinite(err)
    if bool(ok.any()):
        stats.max_ulp = max(stats.max_ulp, float((err[ok] / (2 * half[ok])).max()))
        ratio = ((err - half).clamp_min(0) / acc.clamp_min(torch.finfo(torch.float64).tiny))[ok]
        stats.max_elem_ratio = max(stats.max_elem_ratio, float(ratio.max()))
        zf = z[torch.isfinite(z)]
        if zf.numel():
            stats.max_row_z = max(stats.max_row_z, float(zf.max()))


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids as [start, stop) runs of consecutive values, so each run is one slice read."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def check_rows(spec: ModelSpec, layout: TableLayout, read_emb, read_table, w64: dict[str, torch.Tensor],
               ids: list[int] | None, table_dtype: torch.dtype, compute_dtype: torch.dtype, *,
               lam: float = 2.0, row_z: float = 4.5, chunk: int = 1024, device: torch.device | None = None,
               bar=None) -> RowStats:
    """Check the given token ids (None: every row) chunk by chunk.

    read_emb(start, stop) / read_table(start, stop) return rows [start, stop) of the reference
    embedding and of the stored table; only one chunk of each is in memory at a time.
    """
    t0 = time.monotonic()
    stats = RowStats()
    device = device or torch.device("cpu")
    if ids is None:
        spans = [(a, min(a + chunk, layout.vocab_size)) for a in range(0, layout.vocab_size, chunk)]
    else:
        spans = [(x, min(x + chunk, b)) for a, b in runs(sorted(set(ids))) for x in range(a, b, chunk)]
    w32 = {k: v.float() for k, v in w64.items()}
    batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    pending = 0

    def flush() -> None:
        nonlocal batch, pending
        if not batch:
            return
        e = torch.cat([b[0] for b in batch]).to(device)
        s = torch.cat([b[1] for b in batch]).to(device)
        i = torch.cat([b[2] for b in batch])
        compare_rows(spec, layout, e, s, i, w64, table_dtype, compute_dtype, stats, lam, row_z, w32)
        if bar is not None:
            bar.update(int(i.numel()))
        batch, pending = [], 0

    for a, b in spans:
        batch.append((read_emb(a, b), read_table(a, b), torch.arange(a, b)))
        pending += b - a
        if pending >= chunk:
            flush()
    flush()
    stats.seconds = time.monotonic() - t0
    return stats
