"""Layer-0 shapes beyond attention over q/k/v (issue #17), each a tiny random transformers model converted with
its shipped profile: latent attention (MLA: DeepSeek-V2/V3, GLM-4 MoE Lite, Youtu, MiniCPM3) and sequence mixers
other than attention whose input projection is per token (state-space: Mamba; short convolution: LFM2).

The same checks as tests/test_families_more.py: float32 logits within 1e-5 (relative to the largest logit) of
transformers' and the same greedy generation on a left-padded batch; bfloat16 no farther from the float32 upcast
than the bfloat16 original is; every table row within verify's derived rounding bound of a float64 recomputation.
"""

from __future__ import annotations

import pytest
import test_families_parallel
import tiny
import torch
from test_families_more import BF16_FACTOR, _check_table_rows
from test_families_parallel import _batch, _generate, _logits, bf16_baseline
from transformers import AutoModelForCausalLM

import precompile

FAMILIES = list(tiny.SHAPE_FAMILIES)
converted = test_families_parallel.converted  # (family, dtype) -> (source, OUT_DIR), once per module


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_matches_transformers(family, converted):
    src, out = converted(family, "float32")
    enc = _batch()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = precompile.load(out)
    assert type(model).__mro__[1] is type(ref)  # the original class, with layer 0 swapped
    want = _logits(ref, enc)
    got = _logits(model, enc)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    gen = _generate(ref, enc)
    assert len(set(gen[:, -16:].flatten().tolist())) > 2  # greedy decoding is not degenerate
    assert torch.equal(_generate(model, enc), gen)
    _check_table_rows(src, out)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_no_farther_than_original(family, converted):
    src, out = converted(family, "bfloat16")
    enc = _batch()
    upcast, base = bf16_baseline(src, enc)
    model = precompile.load(out)
    assert model.dtype == torch.bfloat16
    dist = (_logits(model, enc) - upcast).pow(2).mean().sqrt().item()
    assert dist <= BF16_FACTOR * base, (dist, base)
    _check_table_rows(src, out)
