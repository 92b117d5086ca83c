"""How far a converted model's logits may be from the original's: derived, never a per-dtype constant.

A half-precision model rounds every layer's output, so its logits sit at some distance from the
same weights run in float32; that distance grows with the depth and the logits' scale, so a fixed
number that fits a 3-layer random model rejects a correct 30-layer trained one. A correct conversion
rounds too (differently: the table is computed in float32 and rounded once), so it may be as far from
float32 as the original is, times FACTOR, and from the original by the sum of both distances.

Two rules, both pure functions of measured statistics:
- `fp32`: the original's measured distance to its own float32 run sets the allowance.
- `roundoff`: without a float32 run the original's distance is estimated from the dtype's unit
  roundoff u, the depth L and the logits' scale: mean ~ C_MEAN*u*sqrt(L)*rms, max ~ C_MAX*u*sqrt(L)*max.
float32 models keep fixed limits: both models run in float32 and differ only by summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Converted-to-float32 distance (mean, RMS) allowed per unit of the original's. Measured ratios
# (converted/original): SmolLM2-135M bfloat16 mean 0.90, RMS 0.81; tiny llama/gemma/qwen2/mixtral
# bfloat16 mean 0.82-0.99, RMS 0.83-1.01. 1.5 leaves room for that spread; an added error as large as the
# original's own rounding (independent: sqrt(2) = 1.41) comes close to it, one twice as large (sqrt(5)) fails.
FACTOR = 1.5
# Original-to-float32 distance per unit of u*sqrt(L)*scale, measured in bfloat16 (SmolLM2-135M,
# 30 layers; tiny llama/gemma/qwen2/mixtral, 3 layers): mean / (u*sqrt(L)*rms) 1.1-2.4, max / (u*sqrt(L)*max|logit|)
# 1.7-3.6. The constants sit just above the largest measured value: they estimate the original's
# distance, to which the roundoff rule then applies the same (1 + FACTOR) as the float32 rule.
C_MEAN = 2.5
C_MAX = 4.0
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11, "float32": 2.0**-24}
FLOAT32_LIMITS = {"max_abs_diff": 1e-3, "mean_abs_diff": 1e-4, "kl": 1e-6, "top1": 1.0}
LOGIT_KEYS = ("max_abs_diff", "mean_abs_diff", "kl", "top1")


@dataclass
class Distance:
    """Running distance between two sets of logits over the same positions ([P, V] per batch)."""

    positions: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0  # sum over positions of the mean |d| over the vocabulary
    sum_sq: float = 0.0  # sum of d^2 over all values
    values: int = 0
    kl_sum: float = 0.0  # KL(first || second), summed over positions
    kl_max: float = 0.0
    top1_agree: int = 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        d = a - b
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl = (la.exp() * (la - lb)).sum(-1).clamp_min(0)
        self.positions += a.shape[0]
        self.max_abs = max(self.max_abs, float(d.abs().max()))
        self.sum_abs += float(d.abs().mean(-1).sum())
        self.sum_sq += float((d * d).sum())
        self.values += d.numel()
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.top1_agree += int((a.argmax(-1) == b.argmax(-1)).sum())

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / max(self.positions, 1)

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_sq / max(self.values, 1))

    @property
    def kl(self) -> float:
        return self.kl_sum / max(self.positions, 1)

    @property
    def top1(self) -> float:
        return self.top1_agree / max(self.positions, 1)


@dataclass
class Scale:
    """The original's logits: spread (RMS about each position's mean), largest |logit|, top-1 margins."""

    sum_sq: float = 0.0
    values: int = 0
    max_abs: float = 0.0
    margins: list[float] = field(default_factory=list)

    def add(self, logits: torch.Tensor) -> None:
        x = logits.double()
        c = x - x.mean(-1, keepdim=True)
        self.sum_sq += float((c * c).sum())
        self.values += c.numel()
        self.max_abs = max(self.max_abs, float(x.abs().max()))
        top = x.topk(min(2, x.shape[-1]), -1).values
        self.margins += (top[:, 0] - top[:, -1]).tolist()

    @property
    def rms(self) -> float:
        return math.sqrt(self.sum_sq / max(self.values, 1))


@dataclass
class Allowance:
    """Logit thresholds (original vs converted) and the rule and measurements they come from."""

    rule: str
    max_abs_diff: float
    mean_abs_diff: float
    kl: float
    top1: float
    basis: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in LOGIT_KEYS}


def _top1_floor(flip_rate: float, positions: int, factor: float) -> float:
    """Top-1 agreement implied by a flip rate against float32: the original flips at `flip_rate`, the
    converted model at most `factor` times that, so they disagree on at most (1 + factor) * rate of the
    positions (union bound). A rate below one position cannot be measured, so it counts as one."""
    return max(0.0, 1.0 - (1.0 + factor) * max(flip_rate, 1.0 / max(positions, 1)))


def from_fp32(original: Distance, factor: float = FACTOR) -> Allowance:
    """The original's measured distance to float32 sets every limit. If the converted model is within
    `factor` of it, the triangle inequality bounds |original - converted| by (1 + factor) times it; KL
    is second order in the logit difference, so it scales by (1 + factor)^2."""
    k = 1.0 + factor
    return Allowance("fp32", k * original.max_abs, k * original.mean_abs, k * k * original.kl,
                     _top1_floor(1.0 - original.top1, original.positions, factor),
                     {"original_to_fp32_max": original.max_abs, "original_to_fp32_mean": original.mean_abs,
                      "original_to_fp32_kl": original.kl, "original_to_fp32_top1": original.top1,
                      "factor": factor})


def from_roundoff(dtype: str, layers: int, scale: Scale, factor: float = FACTOR) -> Allowance:
    """Without a float32 run: the original's distance to float32 estimated from u*sqrt(L)*scale (each
    layer rounds its output with relative error u, independent errors add in quadrature), then the
    float32 rule's (1 + factor). KL ~ Var/2 of the difference, whose sigma is mean * sqrt(pi/2). The
    original's top-1 can flip against float32 where its margin is within the rounding of two logits'
    difference, about sqrt(2) sigma = 1.8 * mean: positions with a margin under 2 * mean count as flips."""
    u = UNIT_ROUNDOFF[dtype]
    unit = u * math.sqrt(max(layers, 1))
    est_max, est_mean = C_MAX * unit * scale.max_abs, C_MEAN * unit * scale.rms
    k = 1.0 + factor
    mean = k * est_mean
    flips = sum(m <= 2 * est_mean for m in scale.margins) / max(len(scale.margins), 1)
    return Allowance("roundoff", k * est_max, mean, math.pi / 4 * mean * mean,
                     _top1_floor(flips, len(scale.margins), factor),
                     {"unit_roundoff": u, "layers": layers, "logit_rms": scale.rms, "logit_max": scale.max_abs,
                      "estimated_original_to_fp32_max": est_max, "estimated_original_to_fp32_mean": est_mean,
                      "factor": factor})


def fixed_float32() -> Allowance:
    """float32 against float32: only the order of summation differs."""
    return Allowance("float32", **FLOAT32_LIMITS)


def apply_given(a: Allowance, given: dict) -> Allowance:
    """User thresholds override the derived ones, key by key; the rule says which were given."""
    keys = [k for k in LOGIT_KEYS if given.get(k) is not None]
    if not keys:
        return a
    vals = {k: (given[k] if k in keys else getattr(a, k)) for k in LOGIT_KEYS}
    rule = a.rule + " + given " + ",".join(keys) if len(keys) < len(LOGIT_KEYS) else "given"
    return Allowance(rule, **vals, basis=a.basis)
