"""convert checks itself: layer 0 of transformers' own model against the conversion, before OUT_DIR appears.

Every shipped family passes in float32 and bfloat16; a profile that contradicts the model's forward
makes convert fail (exit 1) with nothing written and the source untouched, for each kind of
contradiction; --no-self-check skips the check.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

import precompile
import tiny
from conftest import ROOT, run_cli_here, tree_snapshot
from precompile.check.self_check import (
    ATTENTION, OUTPUT, RESIDUAL, SEQUENCES, check_tokens, compared_points, point_bound)
from precompile.errors import VerificationError

pytestmark = pytest.mark.numeric

SHIPPED = [f for f in tiny.FAMILIES if f != "qwen3"]  # qwen3 has no shipped profile


@pytest.fixture
def cli():
    """In this process: these tests are about convert's self-check verdicts and lines, not the process."""
    return run_cli_here


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", SHIPPED)
def test_every_shipped_family_passes(family, dtype, checkpoint, tmp_path):
    converted = precompile.convert(str(checkpoint(family, dtype)), tmp_path / "out", chunk_size=64)
    result, spec = converted.self_check, converted.plan.spec
    assert result is not None and result.passed and result.dtype == dtype
    assert [p.name for p in result.points] == list(compared_points(spec.block, spec.layer0_experts))
    for p in result.points:
        assert p.diff <= p.bound and p.scale > 0, p
        assert p.bound <= 2 * p.original + 2 * torch.finfo(getattr(torch, dtype)).eps * p.scale * 1.0001


def test_compared_points_follow_the_block_and_the_experts():
    assert compared_points("serial", 1) == (RESIDUAL, ATTENTION, OUTPUT)
    assert compared_points("parallel", 1) == (ATTENTION, OUTPUT)  # its residual input holds the FFN by design
    assert compared_points("serial", 8) == (RESIDUAL, ATTENTION)  # a router may flip on a rounding difference


def test_bound_is_the_originals_distance_plus_a_few_ulp():
    assert point_bound(0.0, 1.0, torch.float32) == pytest.approx(2 * 2.0**-23)
    assert point_bound(0.01, 4.0, torch.bfloat16) == pytest.approx(0.02 + 8 * 2.0**-7)


def test_tokens_hold_the_specials_the_ends_and_random_ids(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"150": {"content": "<x>", '
                                                    '"special": true}, "151": {"content": "y", "special": false}}}')
    tokens = check_tokens({"bos_token_id": 7, "eos_token_id": [9, 11], "pad_token_id": None}, tmp_path, 1000)
    assert tokens.shape[0] == SEQUENCES and tokens.shape[1] > 1  # positions beyond 0
    ids = set(tokens.flatten().tolist())
    assert {0, 999, 7, 9, 11, 150} <= ids and tokens.numel() >= 256 + 6
    assert torch.equal(tokens, check_tokens({"bos_token_id": 7, "eos_token_id": [9, 11]}, tmp_path, 1000))


def _bad_profile(tmp_path: Path, shipped: str, change) -> Path:
    data = yaml.safe_load((ROOT / "configs" / f"{shipped}.yaml").read_text())
    bad = copy.deepcopy(data)
    change(bad)
    assert bad != data
    path = tmp_path / f"bad-{shipped}.yaml"
    path.write_text(yaml.safe_dump(bad))
    return path


def _swap_kv(p: dict) -> None:
    k, v = p["projections"][1], p["projections"][2]
    k["weight"], v["weight"] = v["weight"], k["weight"]


def _serial(p: dict) -> None:
    p["block"] = "serial"
    p.pop("ffn")


# Each kind of contradiction: (family, shipped profile, change, the tensor where it shows first).
CONTRADICTIONS = {
    "doubled embedding scale": ("gemma", "gemma", lambda p: p["embedding"].update(scale={"value": 16.0}), RESIDUAL),
    "missing norm offset": ("gemma", "gemma", lambda p: p["attn_norm"].pop("offset"), ATTENTION),
    "scale the model does not apply": ("llama", "llama", lambda p: p["embedding"].update(scale={"sqrt": "hidden_size"}),
                                       RESIDUAL),
    "scale the model applies, left out": ("gemma", "gemma", lambda p: p["embedding"].pop("scale"), RESIDUAL),
    "wrong activation": ("gpt_neox", "gpt_neox", lambda p: p["ffn"].update(activation="relu"), OUTPUT),
    "wrong norm eps": ("llama", "llama", lambda p: p["attn_norm"].update(eps=1.0), ATTENTION),
    "swapped k and v": ("mistral", "mistral", _swap_kv, ATTENTION),
    # the FFN reads the input norm the conversion replaces: only the layer output shows it (on one sequence)
    "a shared-norm parallel block declared serial": ("gptj", "gptj", _serial, OUTPUT),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", list(CONTRADICTIONS))
def test_a_profile_that_contradicts_the_forward_fails(kind, dtype, checkpoint, tmp_path):
    family, shipped, change, where = CONTRADICTIONS[kind]
    src = checkpoint(family, dtype)
    before = tree_snapshot(src)
    profile = _bad_profile(tmp_path, shipped, change)
    out = tmp_path / "out"
    with pytest.raises(VerificationError) as err:
        precompile.convert(str(src), out, profile=str(profile))
    msg = str(err.value)
    assert "self-check: layer 0" in msg and f"at its {where}" in msg and f"profile {shipped}" in msg
    diff, bound = (float(msg.split(s)[1].split()[0]) for s in ("max |difference| ", "> bound "))
    # far past the bound, not at its edge: bfloat16's own rounding is 2^-9 of a value, float32's 2^-24
    assert diff > (1e4 if dtype == "float32" else 2) * bound
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [profile.name]
    assert tree_snapshot(src) == before


def test_cli_exits_1_with_one_line_and_no_self_check_skips(checkpoint, tmp_path, cli):
    src = checkpoint("gemma")
    profile = _bad_profile(tmp_path, "gemma", CONTRADICTIONS["doubled embedding scale"][2])
    r = cli("convert", src, tmp_path / "out", "--profile", profile)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("verification failed: self-check: layer 0") and "Traceback" not in r.stderr
    assert "profile gemma" in lines[-1] and "residual input" in lines[-1]
    assert not (tmp_path / "out").exists()
    r = cli("convert", src, tmp_path / "out", "--profile", profile, "--no-self-check")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "precompile.json").exists() and "self-check" not in r.stderr


def test_report_line_and_overlay(checkpoint, tmp_path, cli):
    src = checkpoint("llama_tied")
    r = cli("convert", src, tmp_path / "full")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("self-check: layer 0 against transformers' llama"))
    assert "residual input 0 (bound" in line and "attention output" in line and line.rstrip().endswith("s")
    result = precompile.convert(str(src), tmp_path / "overlay", overlay=True).self_check
    assert result.passed and len(result.points) == 3
    profile = _bad_profile(tmp_path, "llama", CONTRADICTIONS["wrong norm eps"][2])
    with pytest.raises(VerificationError):
        precompile.convert(str(src), tmp_path / "bad-overlay", overlay=True, profile=str(profile))
    assert not (tmp_path / "bad-overlay").exists()
    assert precompile.convert(str(src), tmp_path / "skipped", self_check=False).self_check is None



def test_a_model_that_cannot_run_is_not_published(checkpoint, tmp_path, monkeypatch):
    """Whatever transformers raises while running layer 0, the conversion is refused in one line, unwritten."""
    import precompile.check.self_check as sc

    def broken(*_args, **_kwargs):
        raise RuntimeError("Tensor on device meta is not on the expected device cpu!\nsecond line")

    monkeypatch.setattr(sc, "_capture", broken)
    with pytest.raises(VerificationError, match=r"could not run layer 0 .*RuntimeError: Tensor on device meta.*"
                                                r"--no-self-check") as err:
        precompile.convert(str(checkpoint("llama")), tmp_path / "out")
    assert "second line" not in str(err.value) and not (tmp_path / "out").exists()


def test_layer_zero_is_the_real_one_when_layers_differ_by_index(checkpoint, tmp_path):
    """GPT-NeoX-Japanese gives only the last layer's attention a bias (dense_bias): a one-layer copy of the model
    would build layer 0 as that last layer and look for a bias the checkpoint's layer 0 does not have. The
    self-check builds every layer (on meta), so layer 0 is the real one and the conversion passes."""
    from tiny import WRITTEN_PROFILES

    src = checkpoint("gpt_neox_japanese")
    names = set(tiny.read_json(src / "model.safetensors.index.json")["weight_map"])
    last = tiny.PROFILE_SAMPLE_FAMILIES["gpt_neox_japanese"]["num_hidden_layers"] - 1
    assert f"gpt_neox_japanese.layers.{last}.attention.dense_bias" in names
    assert "gpt_neox_japanese.layers.0.attention.dense_bias" not in names
    prof = tmp_path / "p.yaml"
    prof.write_text(WRITTEN_PROFILES["gpt_neox_japanese"])
    result = precompile.convert(str(src), tmp_path / "out", profile=str(prof), device="cpu").self_check
    assert result is not None and result.passed
    assert [p.name for p in result.points] == [RESIDUAL, ATTENTION, OUTPUT]
