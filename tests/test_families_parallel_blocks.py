"""Parallel blocks and the families of issue #4, each against transformers itself.

Every family/variant is a tiny random transformers model saved sharded, converted, and loaded
both through `precompile.load` and through the standalone shim in OUT_DIR. float32 must match the
original to rounding (logits and greedy generation on a left-padded batch); bfloat16 must be no
farther from the float32 upcast of the same checkpoint than the bfloat16 original is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import precompile
import tiny
from click.testing import CliRunner
from conftest import QWEN3_PROFILE, bf16_baseline, greedy_ids, load_shim, masked_logits, prompt_batch

from precompile.check.self_check import point_bound
from precompile.cli import main as cli_main
from precompile.compute.table_math import ffn_output
from precompile.plan.table_layout import table_layout
from precompile.profiles.catalog import load_profile
from precompile.profiles.profile_resolution import resolve

D, HD = 64, 16  # hidden size and head_dim of every tiny model here
# family -> (block, table width). The width is written out by hand from the head counts so that a
# wrong layout cannot agree with itself: x (64, left out only when it is the tied stored row) + q + 2 kv.
FAMILIES = {
    "gpt_neox": ("parallel", 64 + 3 * 64),
    "gpt_neox_serial": ("serial", 64 + 3 * 64),
    "gptj": ("parallel", 64 + 3 * 64),
    "phi": ("parallel", 64 + 3 * 64),
    "phi_qk": ("parallel", 64 + 64 + 2 * 32),
    "falcon": ("parallel", 64 + 64 + 2 * 16),
    "falcon_new": ("parallel", 64 + 64 + 2 * 32),
    "falcon_new_1ln": ("parallel", 64 + 64 + 2 * 16),
    "falcon_alibi": ("serial", 64 + 3 * 64),  # tied, x is the stored row: the table leaves x out
    "cohere": ("parallel", 64 + 64 + 2 * 32),
    "bloom": ("serial", 64 + 3 * 64),  # tied, but x is LayerNorm(row): the table keeps x
}
WIDTHS = {**{k: v[1] for k, v in FAMILIES.items()}, "falcon_alibi": 3 * 64}
# Layer-0 tensors that must stay: the attention output projection, plus the FFN side of serial blocks.
KEEP_PARALLEL = r"\.(dense|o_proj|out_proj)\.(weight|bias)$"
KEEP_SERIAL = KEEP_PARALLEL[:-len(r"$")] + r"$|post_attention_layernorm|\.mlp\."
LAYER0 = re.compile(r"\.(layers|h)\.0\.")


def _tensor_numels(path: Path) -> dict[str, int]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                n = 1
                for s in sf.get_slice(k).get_shape():
                    n *= s
                out[k] = n
    return out


def run_cli(*args):
    """The CLI in-process (a subprocess would spend most of its time importing torch): exit code, output."""
    r = CliRunner().invoke(cli_main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.numeric
@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_matches_transformers(family, converted_family):
    src, out = converted_family(family, "float32")
    enc = prompt_batch()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    via_lib = precompile.load(out)
    via_shim = load_shim(out).load()
    want = masked_logits(ref, enc)
    scale = want.abs().max()
    for model in (via_lib, via_shim):
        assert type(model).__mro__[1] is type(ref)  # the original class, with layer 0 swapped
        got = masked_logits(model, enc)
        assert ((got - want).abs().max() / scale).item() < 1e-5
    gen = greedy_ids(ref, enc)
    assert len(set(gen[:, -16:].flatten().tolist())) > 2  # greedy decoding is not degenerate
    assert torch.equal(greedy_ids(via_lib, enc), gen)
    assert torch.equal(greedy_ids(via_shim, enc), gen)


@pytest.mark.numeric
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_no_farther_than_original(family, converted_family):
    src, out = converted_family(family, "bfloat16")
    enc = prompt_batch()
    upcast, base = bf16_baseline(src, enc)
    for model in (precompile.load(out), load_shim(out).load()):
        assert model.dtype == torch.bfloat16
        dist = (masked_logits(model, enc) - upcast).pow(2).mean().sqrt().item()
        assert dist <= 1.02 * base, (dist, base)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameter_arithmetic(family, converted_family):
    """OUT_DIR = source - eliminated + table; for parallel blocks layer 0's FFN and its norm are gone."""
    src, out = converted_family(family, "float32")
    block, _ = FAMILIES[family]
    before, after = _tensor_numels(src), _tensor_numels(out)
    manifest = json.loads((out / "precompile.json").read_text())
    table = manifest["table"]
    assert manifest["profile"]["block"] == block
    assert table["shape"] == [tiny.VOCAB, WIDTHS[family]]
    eliminated = manifest["eliminated"]
    assert table["guard"] in eliminated and after[table["guard"]] == 1  # the one-element guard (README)
    assert sum(after.values()) == (sum(before.values()) - sum(before[n] for n in eliminated)
                                   + tiny.VOCAB * WIDTHS[family] + 1)
    keep = re.compile(KEEP_PARALLEL if block == "parallel" else KEEP_SERIAL)
    layer0_src = {n for n in before if LAYER0.search(n)}
    assert {n for n in after if LAYER0.search(n)} - {table["guard"]} == {n for n in layer0_src if keep.search(n)}
    extra = set()
    if not tiny.FAMILIES[family]["tie_word_embeddings"]:  # the table replaces an untied input embedding
        extra |= {n for n in before if re.search(r"(embed_in|wte|embed_tokens)\.weight$", n)}
    if family == "bloom":  # the LayerNorm right after the embedding folds into the table
        extra |= {"transformer.word_embeddings_layernorm.weight", "transformer.word_embeddings_layernorm.bias"}
    assert set(eliminated) == {n for n in layer0_src if not keep.search(n)} | extra
    if block == "parallel":
        assert any(".mlp." in n for n in eliminated)


def test_cli_reports_eliminated_weights_and_width(checkpoint, tmp_path):
    src = checkpoint("gpt_neox")
    code, stdout, stderr = run_cli("convert", src, tmp_path / "out", "--device", "cpu")
    assert code == 0, stderr
    text = stdout + stderr
    manifest = json.loads((tmp_path / "out" / "precompile.json").read_text())
    numel = _tensor_numels(src)
    n_elim = sum(numel[n] for n in manifest["eliminated"])
    # untied embedding vocab*d, qkv 3d*d + 3d, MLP d*96 + 96 + 96*d + d, two LayerNorms 4d
    assert n_elim == tiny.VOCAB * D + 3 * D * D + 3 * D + 2 * D * 96 + 96 + D + 4 * D
    assert f"eliminated: {len(manifest['eliminated'])} tensors, {n_elim:,} weights" in text
    assert f"table: [{tiny.VOCAB}, 256]" in text
    assert "parallel block" in text and "x+ffn[0:64]" in text


@pytest.mark.numeric
def test_new_family_by_yaml_alone(checkpoint, tmp_path):
    """A YAML file passed with --profile is enough (here a Qwen3 profile, per-head q/k RMSNorms, written by
    hand; it is used instead of the shipped configs/qwen3.yaml)."""
    src = checkpoint("qwen3")
    prof = tmp_path / "qwen3.yaml"
    prof.write_text(QWEN3_PROFILE)
    code, _, stderr = run_cli("convert", src, tmp_path / "out", "--profile", prof, "--device", "cpu", "--quiet")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "out" / "precompile.json").read_text())
    assert "model.layers.0.self_attn.q_norm.weight" in manifest["eliminated"]
    assert manifest["profile"]["name"] == "qwen3-custom"
    enc = prompt_batch()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = precompile.load(tmp_path / "out")
    want, got = masked_logits(ref, enc), masked_logits(model, enc)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert torch.equal(greedy_ids(model, enc), greedy_ids(ref, enc))


MOE_PROFILE = """
name: parallel-moe
match: {model_types: [mixtral]}
block: parallel
sizes: {hidden_size: [hidden_size], num_heads: [num_attention_heads], num_kv_heads: [num_key_value_heads],
        vocab_size: [vocab_size], n_layers: [num_hidden_layers]}
embedding: {tensor: model.embed_tokens.weight, module: model.embed_tokens}
attn_norm: {kind: rms, weight: model.layers.0.input_layernorm.weight, eps: [rms_norm_eps]}
projections:
  - {role: q, weight: model.layers.0.self_attn.q_proj.weight, module: model.layers.0.self_attn.q_proj}
  - {role: k, weight: model.layers.0.self_attn.k_proj.weight, module: model.layers.0.self_attn.k_proj}
  - {role: v, weight: model.layers.0.self_attn.v_proj.weight, module: model.layers.0.self_attn.v_proj}
attention_module: model.layers.0.self_attn
ffn:
  kind: moe
  activation: {config: hidden_act, default: silu}
  norm: {kind: rms, weight: model.layers.0.post_attention_layernorm.weight, eps: [rms_norm_eps]}
  router: model.layers.0.block_sparse_moe.gate.weight
  experts: [num_local_experts]
  top_k: [num_experts_per_tok]
  expert_kind: glu
  gate: model.layers.0.block_sparse_moe.experts.{e}.w1.weight
  up: model.layers.0.block_sparse_moe.experts.{e}.w3.weight
  down: model.layers.0.block_sparse_moe.experts.{e}.w2.weight
  module: model.layers.0.mlp
"""


@pytest.mark.numeric
def test_parallel_moe_ffn_is_expressible(checkpoint, tmp_path):
    """A router + experts FFN in the format computes what transformers' Mixtral MoE block computes."""
    src = checkpoint("mixtral")
    prof = tmp_path / "moe.yaml"
    prof.write_text(MOE_PROFILE)
    config = json.loads((src / "config.json").read_text())
    spec = resolve(load_profile(prof), config)
    assert spec.ffn.kind == "moe" and len(spec.ffn.experts) == 4 and spec.ffn.top_k == 2
    numel = _tensor_numels(src)
    layout = table_layout(spec, frozenset(numel))
    moe = {n for n in numel if ".0.block_sparse_moe." in n}
    assert len(moe) == 13 and moe <= set(layout.eliminated)
    w = {}
    for f in src.glob("*.safetensors"):
        with safe_open(f, framework="pt") as sf:
            w.update({k: sf.get_tensor(k) for k in sf.keys() if k in moe})
    h = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref.model.layers[0].mlp(h)
    got = ffn_output(spec.ffn, h, w)
    # CPUs round float32 differently, so no fixed tolerance: transformers' float32 result must be as near the
    # format's formula in float64 as ours in float32 is (transformers' grouped experts run no float64)
    exact = ffn_output(spec.ffn, h.double(), {k: v.double() for k, v in w.items()})
    err, ref_err = ((x.double() - exact).abs().max().item() for x in (got, want))
    assert ref_err <= point_bound(err, exact.abs().max().item(), torch.float32), (ref_err, err)


@pytest.mark.parametrize("family, overrides, words", [
    ("bloom", {"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ("falcon", {"new_decoder_architecture": True, "parallel_attn": False, "num_ln_in_parallel_attn": None},
     "parallel_attn"),
])
def test_unsupported_variants_are_refused(family, overrides, words, checkpoint, tmp_path):
    src = tiny.save_checkpoint(tiny.build_model("gpt_neox"), tmp_path / "src", shard_kb=None)
    config = tiny.make_config(family, **overrides).to_dict()
    (src / "config.json").write_text(json.dumps(config))
    code, _, stderr = run_cli("convert", src, tmp_path / "out", "--device", "cpu")
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and words in stderr and "cannot be precompiled" in stderr
    assert not (tmp_path / "out").exists()
