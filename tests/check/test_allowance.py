"""verify's logit verdict: limits derived from the original's distance to float32, or from unit roundoff."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from precompile import convert
from precompile.check.allowance import C_MAX, C_MEAN, FACTOR, Distance, Scale, apply_given, from_fp32, from_roundoff
from precompile.check.verify import verify
from precompile.io.hashed_copy import file_sha256

NEW = 3


def test_fp32_rule_scales_the_originals_distance():
    lf = torch.tensor([[0.0, 1.0, 4.0], [2.0, 0.0, -1.0]])
    lo = lf + torch.tensor([[0.1, -0.1, 0.0], [0.0, 0.2, 0.0]])
    d = Distance()
    d.add(lo, lf)
    a = from_fp32(d, 1.5)
    assert a.rule == "fp32"
    assert a.max_abs_diff == pytest.approx(2.5 * 0.2)
    assert a.mean_abs_diff == pytest.approx(2.5 * d.mean_abs) and d.mean_abs == pytest.approx((0.2 / 3 + 0.2 / 3) / 2)
    assert a.kl == pytest.approx(2.5**2 * d.kl)
    assert d.top1 == 1.0 and a.top1 == 0.0  # no flip seen: one position of two counts, 1 - 2.5 * 1/2 < 0


def test_roundoff_rule_grows_with_depth_scale_and_unit_roundoff():
    s = Scale()
    s.add(torch.tensor([[3.0, -3.0, 0.0, 0.0]] * 4))
    b1 = from_roundoff("bfloat16", 4, s)
    b2 = from_roundoff("bfloat16", 16, s)
    h = from_roundoff("float16", 4, s)
    unit = 2.0**-8 * math.sqrt(4)
    assert b1.max_abs_diff == pytest.approx((1 + FACTOR) * C_MAX * unit * 3.0)
    assert b1.mean_abs_diff == pytest.approx((1 + FACTOR) * C_MEAN * unit * s.rms)
    assert b2.max_abs_diff == pytest.approx(2 * b1.max_abs_diff)  # sqrt(depth)
    assert h.max_abs_diff == pytest.approx(b1.max_abs_diff / 8)  # u: 2^-11 vs 2^-8
    assert b1.rule == "roundoff" and b1.basis["layers"] == 4


def test_given_thresholds_override_and_are_named():
    s = Scale()
    s.add(torch.randn(3, 10))
    a = apply_given(from_roundoff("bfloat16", 2, s), {"max_abs_diff": 0.5, "kl": None})
    assert a.max_abs_diff == 0.5 and a.rule == "roundoff + given max_abs_diff"


@pytest.fixture(scope="module")
def bf16_pair(checkpoint, tmp_path_factory):
    src = checkpoint("llama", "bfloat16")
    out = tmp_path_factory.mktemp("bf16") / "out"
    convert(str(src), out)
    return src, out


@pytest.mark.parametrize("fp32", [True, False])
def test_bfloat16_passes_under_each_rule_and_says_which(bf16_pair, fp32):
    _, out = bf16_pair
    r = verify(out, prompts=tiny.PROMPTS, max_new_tokens=NEW, rows=0, fp32_reference=fp32)
    c = {x["name"]: x for x in r["checks"]}
    assert r["passed"], c
    assert c["logits"]["threshold"]["rule"] == ("fp32" if fp32 else "roundoff")
    if fp32:  # the thresholds are (1 + factor) times the original's own distance to float32
        basis = c["logits"]["threshold"]["basis"]
        assert c["logits"]["threshold"]["max_abs_diff"] == pytest.approx(
            (1 + FACTOR) * basis["original_to_fp32_max"], rel=1e-3)
        assert c["fp32-reference"]["metrics"]["mean_ratio"] <= FACTOR


@pytest.mark.parametrize("fp32", [True, False])
def test_bfloat16_v_columns_10_percent_off_fail_logits_under_each_rule(bf16_pair, tmp_path, fp32):
    """Every stored v value 10% too large (manifest re-hashed): the model loads and runs, and the logits
    move by about twice the derived limits (measured: max 0.375 against 0.171 and 0.326, mean 0.075
    against 0.031 and 0.054), which the former fixed bfloat16 limits (max 1.0, mean 0.1) let through."""
    _, out = bf16_pair
    out2 = shutil.copytree(out, tmp_path / "out")
    m = json.loads((out2 / "precompile.json").read_text())
    v = next(c for c in m["table"]["columns"] if c["name"] == "v")
    path = out2 / m["table"]["file"]
    tensors = load_file(path)
    tensors[m["table"]["tensor"]][:, v["start"]:v["stop"]] *= 1.1
    save_file(tensors, path, metadata={"format": "pt"})
    m["outputs"][path.name] = file_sha256(path)
    (out2 / "precompile.json").write_text(json.dumps(m))
    r = verify(out2, prompts=tiny.PROMPTS, max_new_tokens=NEW, rows=0, fp32_reference=fp32)
    c = {x["name"]: x for x in r["checks"]}
    assert c["load"]["passed"] and not c["logits"]["passed"]
    assert c["logits"]["metrics"]["mean_abs_diff"] > c["logits"]["threshold"]["mean_abs_diff"]


def test_cli_given_threshold_wins(bf16_pair, tmp_path):
    from conftest import run_cli_here

    _, out = bf16_pair
    j = tmp_path / "r.json"
    r = run_cli_here("verify", out, "--max-new-tokens", 1, "--rows", 0, "--no-fp32-reference", "--max-abs-diff", 0,
                "--json", j, "-q")
    assert r.returncode == 1, r.stdout + r.stderr
    logits = next(c for c in json.loads(j.read_text())["checks"] if c["name"] == "logits")
    assert not logits["passed"] and logits["threshold"]["max_abs_diff"] == 0
    assert logits["threshold"]["rule"] == "roundoff + given max_abs_diff"
    assert "roundoff + given max_abs_diff allowance" in r.stdout  # the threshold column names the rule (issue 25)
