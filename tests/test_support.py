"""The support matrix: every causal LM of the installed transformers is classified, docs/support.md is what the
generator writes now, and every type it calls supported is converted and compared with transformers by a test."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import tiny
from conftest import ROOT

from precompile.profiles import support
from precompile.profiles.catalog import builtin_profiles, refusals
from precompile.profiles.shipped import STATUSES, shipped_matrix

DOC = ROOT / "docs" / "support.md"


@pytest.fixture(scope="module")
def matrix() -> list[support.Support]:
    return support.support_matrix()


def test_every_registry_type_is_classified(matrix):
    """A transformers upgrade that adds a model type the facts cannot decide fails here (drift)."""
    assert [r.model_type for r in matrix] == sorted(support.registry())
    unclassified = [f"{r.model_type} ({r.architecture}): {r.detail}" for r in matrix if r.status not in STATUSES]
    assert not unclassified, "add configs/_support.yaml entries or signals for: " + "; ".join(unclassified)
    assert all(r.detail for r in matrix)


def test_an_undecidable_type_is_reported_unclassified():
    """The drift check can fail: a registry entry whose source the facts cannot read stays unclassified."""
    r = support.classify("no_such_type", "NoSuchForCausalLM", builtin_profiles(), refusals(), {})
    assert r.status == "unclassified" and "configs/_support.yaml" in r.detail


def _doc_version() -> str:
    return re.search(r"Generated from transformers (\S+)'s", DOC.read_text(encoding="utf-8")).group(1)


def test_docs_support_md_is_up_to_date(matrix):
    import transformers

    if _doc_version() != transformers.__version__:  # the drift test above still runs on this version
        pytest.skip(f"docs/support.md describes transformers {_doc_version()}, {transformers.__version__} is installed")
    assert DOC.read_text(encoding="utf-8") == support.to_markdown(matrix), \
        "docs/support.md is stale: run python -m precompile.profiles.support --write docs/support.md"


def test_shipped_classification_is_up_to_date(matrix):
    """What `precompile profiles` prints (configs/_support_matrix.json) is what the generator writes now."""
    import transformers

    version, rows = shipped_matrix()
    if version != transformers.__version__:
        pytest.skip(f"the shipped classification describes transformers {version}, {transformers.__version__} is "
                    "installed")
    assert (ROOT / "configs" / support.MATRIX_FILE).read_text(encoding="utf-8") == \
        support.to_json(matrix, transformers.__version__), \
        "configs/_support_matrix.json is stale: run python -m precompile.profiles.support --write docs/support.md"
    assert rows == matrix


def test_classification_follows_the_facts(matrix):
    """Representative rows, each decided by a different fact."""
    by = {r.model_type: r for r in matrix}
    assert by["llama"].status == support.SUPPORTED and by["llama"].detail == "llama"
    assert by["gpt2"].status == support.REFUSED and "absolute position" in by["gpt2"].detail  # _refused.yaml
    assert by["bert"].status == support.REFUSED and "absolute position" in by["bert"].detail  # source signal
    assert by["bart"].status == support.REFUSED and "encoder-decoder" in by["bart"].detail  # is_encoder_decoder
    assert by["deepseek_v3"].status == support.SUPPORTED and by["mamba"].status == support.SUPPORTED
    # latent attention is expressible: an MLA type without a profile needs only the YAML
    assert by["axk1"].status == support.NOT_YET and "schema expresses its latent attention" in by["axk1"].detail
    assert by["deepseek_v32"].status == support.NOT_YET and "not softmax attention" in by["deepseek_v32"].detail
    assert by["qwen3_next"].status == support.NOT_YET and "in_proj_ba" in by["qwen3_next"].detail  # _support.yaml
    assert by["rwkv"].status == support.REFUSED and "token shift" in by["rwkv"].detail  # configs/_support.yaml
    olmo2, gptj, granite = by["olmo2"].shape, by["gptj"].shape, by["granite"].shape
    assert (olmo2.norm, olmo2.qk_norm) == ("none", "full width")
    assert (gptj.block, gptj.norm) == ("parallel", "layer")
    assert granite.embedding_scale == "outside the module"
    for shape in ("no norm before attention", "q/k norms over the whole projection width"):
        if not support.expressible(shape):  # until the schema expresses it, the matrix says it is missing
            assert shape in by["olmo2"].detail or by["olmo2"].status == support.SUPPORTED


# Rows that once said "a YAML profile should do" but whose layer 0 a profile cannot express or the loader cannot
# run (each found by writing the profile), with words of the reason the matrix now gives.
NOT_PROMISED = {
    "jetmoe": "kv_proj",  # the query from a mixture of attention experts, a fused k/v projection
    "nanochat": "also the final norm",  # one norm module before and after the layers
    "minimax": "residual stream",  # the attention norm's output is the residual
    "afmoe": "gate_proj", "laguna": "g_proj",  # gated attention: another projection of the normed input
    "minimax_m3_vl_text": "indexer",
    "gemma4_text": "v_norm",  # a norm on v
    "mimo_v2_flash": "v_head_dim",
    "moshi": "more than the input",  # q_proj(hidden_states, codebook_idx)
    "phi4_multimodal": "embed_tokens_extend",  # other modalities' features replace some rows
    "gemma3n_text": "computes from its input first",  # AltUp's prediction feeds the attention norm
    "xlnet": "serial or parallel",
}


def test_rows_a_profile_cannot_serve_are_not_promised(matrix):
    by = {r.model_type: r for r in matrix}
    for model_type, words in NOT_PROMISED.items():
        row = by[model_type]
        assert row.status == support.NOT_YET and "should do" not in row.detail and words in row.detail, row


def test_a_forward_reading_only_the_embedding_weights_device_is_promised(matrix):
    """Llama 4 reads `self.embed_tokens.weight.device`, which the converted embedding's `.weight` serves tied or
    untied (tests/test_transformers_api.py converts it); a forward reading the weight's values is not promised."""
    by = {r.model_type: r for r in matrix}
    assert "should do" in by["llama4_text"].detail and "embedding's weight" not in by["llama4_text"].detail
    for model_type in ("qwen4_exp_text", "gemma4_text"):
        assert "should do" not in by[model_type].detail, by[model_type]


def test_overrides_name_registry_types():
    """configs/_support.yaml decides only types transformers has, and never one the facts already refuse."""
    registry = support.registry()
    assert set(support._overrides()) <= set(registry)


def _tiny_model_types() -> dict[str, str]:
    """tiny family name -> model type, over every *FAMILIES registry of tests/tiny.py."""
    out = {}
    for name, value in vars(tiny).items():
        if name.endswith("FAMILIES") and isinstance(value, dict):
            out.update({fam: kw["model_type"] for fam, kw in value.items() if "model_type" in kw})
    return out


def _tested_types() -> dict[str, set[str]]:
    """model type -> dtypes ('float32', 'bfloat16') of the collected tests parametrized with a tiny family of it."""
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    types = _tiny_model_types()
    out: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        m = re.fullmatch(r"tests/\S+::(\w+)\[(.+)\]", line.strip())
        if not m:
            continue
        params = m.group(2).split("-")
        dtypes = {d for d in ("float32", "bfloat16") if d in m.group(1) or d in params}
        for p in params:
            if p in types:
                out.setdefault(types[p], set()).update(dtypes)
    return out


def test_every_supported_type_is_compared_with_transformers(matrix):
    """'supported' cannot lie: each supported model type has a tiny-model test in float32 and in bfloat16
    (a collected test parametrized with a tiny family of that type, the dtype in its name or parameters)."""
    tested = _tested_types()
    assert tested.get("llama") == {"float32", "bfloat16"}  # the collection itself works
    missing = {r.model_type: sorted({"float32", "bfloat16"} - tested.get(r.model_type, set()))
               for r in matrix if r.status == support.SUPPORTED}
    assert not {t: d for t, d in missing.items() if d}, "supported types without tests: " + str(missing)


def test_cli_profiles_prints_the_matrix(matrix):
    text = support.to_text(matrix)
    for r in matrix:
        row = rf"^  {re.escape(r.model_type)} +{re.escape(r.architecture)} "
        assert re.search(row, text, re.MULTILINE), r.model_type
    assert "not yet (" in text and "refused (" in text and "supported (" in text


def test_generator_runs_from_the_command_line(tmp_path):
    out, data = tmp_path / "support.md", tmp_path / "support.json"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "precompile.profiles.support", *args, "--data", str(data)],
                              capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)

    r = run("--write", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text().startswith("# Support matrix\n") and "| llama | LlamaForCausalLM |" in out.read_text()
    assert shipped_matrix(data)[1] == support.support_matrix()
    r = run("--check", str(out))
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
    for path, old, new in ((out, "| llama |", "| llama2 |"), (data, '"llama"', '"llama2"')):
        text = path.read_text()
        path.write_text(text.replace(old, new))
        r = run("--check", str(out))
        assert r.returncode == 1 and f"{path} stale" in r.stdout, r.stdout + r.stderr
        path.write_text(text)



# --- "a YAML profile should do": profiles written from configs/README.md, each converting a tiny model exactly ---

_LLAMA_LIKE = """
name: {name}-written
match: {{model_types: [{name}]}}
block: serial
sizes: {{hidden_size: [hidden_size], num_heads: [num_attention_heads], num_kv_heads: [num_key_value_heads],
        head_dim: [head_dim], vocab_size: [vocab_size], n_layers: [num_hidden_layers],
        intermediate_size: [intermediate_size]}}
embedding: {{tensor: model.embed_tokens.weight, module: model.embed_tokens{extra_embedding}}}
attn_norm: {{kind: rms, weight: model.layers.0.input_layernorm.weight, eps: [rms_norm_eps],
            module: model.layers.0.input_layernorm}}
projections:
  - {{role: q, weight: model.layers.0.self_attn.q_proj.weight, module: model.layers.0.self_attn.q_proj}}
  - {{role: k, weight: model.layers.0.self_attn.k_proj.weight, module: model.layers.0.self_attn.k_proj}}
  - {{role: v, weight: model.layers.0.self_attn.v_proj.weight, module: model.layers.0.self_attn.v_proj}}
attention_module: model.layers.0.self_attn
"""
WRITTEN_PROFILES = {
    "ministral3": _LLAMA_LIKE.format(name="ministral3", extra_embedding=""),
    # the forward multiplies the embedding module's output: embedding.multiplier, not scale
    "hyperclovax": _LLAMA_LIKE.format(name="hyperclovax",
                                      extra_embedding=", multiplier: {config: embedding_multiplier}"),
    # attn_sub_norm acts on the attention's output, before o_proj: after layer 0's projections, so nothing to say
    "bitnet": _LLAMA_LIKE.format(name="bitnet", extra_embedding=""),
    # per-head q/k norms; attention sinks stored under another name than the module's (the self-check reads them
    # under transformers' renaming); a mixture of experts whose layer 0 is dense (mlp_only_layers)
    "flint": _LLAMA_LIKE.format(name="flint", extra_embedding="").replace(
        "intermediate_size: [intermediate_size]}",
        "intermediate_size: [moe_intermediate_size], n_experts: [num_experts]}") + """qk_norm:
  q: {kind: rms, weight: model.layers.0.self_attn.q_norm.weight, eps: [rms_norm_eps],
      module: model.layers.0.self_attn.q_norm}
  k: {kind: rms, weight: model.layers.0.self_attn.k_norm.weight, eps: [rms_norm_eps],
      module: model.layers.0.self_attn.k_norm}
dense_layers: {indices: [mlp_only_layers], intermediate_size: [intermediate_size]}
""",
    # a fused per-head qkv without q/k norms: its layout does not matter (the table keeps the module's own);
    # only the last layer's attention has a bias (dense_bias), which layer 0 does not
    "gpt_neox_japanese": """
name: gpt_neox_japanese-written
match: {model_types: [gpt_neox_japanese]}
block: serial
sizes: {hidden_size: [hidden_size], num_heads: [num_attention_heads], vocab_size: [vocab_size],
        n_layers: [num_hidden_layers], intermediate_size: ["hidden_size * intermediate_multiple_size"]}
embedding: {tensor: gpt_neox_japanese.embed_in.weight, module: gpt_neox_japanese.embed_in}
attn_norm: {kind: layer, weight: gpt_neox_japanese.layers.0.input_layernorm.weight,
            bias: gpt_neox_japanese.layers.0.input_layernorm.bias, eps: [layer_norm_eps],
            module: gpt_neox_japanese.layers.0.input_layernorm}
projections:
  - {role: qkv, weight: gpt_neox_japanese.layers.0.attention.query_key_value.weight, heads_interleaved: true,
     module: gpt_neox_japanese.layers.0.attention.query_key_value}
attention_module: gpt_neox_japanese.layers.0.attention
ffn: {kind: mlp, activation: {config: hidden_act, default: gelu},
      up: gpt_neox_japanese.layers.0.mlp.dense_h_to_4h.weight,
      down: gpt_neox_japanese.layers.0.mlp.dense_4h_to_h.weight, module: gpt_neox_japanese.layers.0.mlp}
""",
    # ALiBi (nothing to say), a LayerNorm without bias, a fused [q | k | v]; MPT's FFN is 4 x d_model whatever
    # expansion_ratio says (plan's count only)
    "mpt": """
name: mpt-written
match: {model_types: [mpt]}
block: serial
sizes: {hidden_size: [d_model], num_heads: [n_heads], vocab_size: [vocab_size], n_layers: [n_layers],
        intermediate_size: ["4 * d_model"]}
embedding: {tensor: transformer.wte.weight, module: transformer.wte}
attn_norm: {kind: layer, weight: transformer.blocks.0.norm_1.weight, eps: [layer_norm_epsilon],
            module: transformer.blocks.0.norm_1}
projections:
  - {role: qkv, weight: transformer.blocks.0.attn.Wqkv.weight, module: transformer.blocks.0.attn.Wqkv}
attention_module: transformer.blocks.0.attn
ffn: {kind: mlp, activation: gelu, up: transformer.blocks.0.ffn.up_proj.weight,
      down: transformer.blocks.0.ffn.down_proj.weight, module: transformer.blocks.0.ffn}
""",
    # a parallel block with one shared LayerNorm (as GPT-J); qkv_proj's layout (mp_num groups) is the module's own
    "codegen": """
name: codegen-written
match: {model_types: [codegen]}
block: parallel
sizes: {hidden_size: [n_embd], num_heads: [n_head], vocab_size: [vocab_size], n_layers: [n_layer],
        intermediate_size: [n_inner, "4 * n_embd"]}
embedding: {tensor: transformer.wte.weight, module: transformer.wte}
attn_norm: {kind: layer, weight: transformer.h.0.ln_1.weight, bias: transformer.h.0.ln_1.bias,
            eps: [layer_norm_epsilon], module: transformer.h.0.ln_1}
projections:
  - {role: qkv, weight: transformer.h.0.attn.qkv_proj.weight, module: transformer.h.0.attn.qkv_proj}
attention_module: transformer.h.0.attn
ffn: {kind: mlp, activation: {config: activation_function, default: gelu_tanh},
      up: {weight: transformer.h.0.mlp.fc_in.weight, bias: transformer.h.0.mlp.fc_in.bias},
      down: {weight: transformer.h.0.mlp.fc_out.weight, bias: transformer.h.0.mlp.fc_out.bias},
      module: transformer.h.0.mlp}
""",
}


def test_written_profiles_cover_should_do_rows(matrix):
    """The sample below is of rows the matrix promises a profile for (at least five of them)."""
    by = {r.model_type: r for r in matrix}
    assert len(WRITTEN_PROFILES) >= 5
    for family in WRITTEN_PROFILES:
        row = by[tiny.PROFILE_SAMPLE_FAMILIES[family]["model_type"]]
        assert row.status == support.NOT_YET and "a YAML profile should do" in row.detail, row


@pytest.mark.numeric
@pytest.mark.parametrize("family", sorted(WRITTEN_PROFILES))
def test_a_written_profile_converts_exactly(family, checkpoint, tmp_path):
    """A profile written from configs/README.md for a "should do" row converts a tiny model of the family: the
    self-check passes, and float32 logits and greedy generation match transformers'."""
    import torch
    from test_families_parallel import _batch, _generate, _logits
    from transformers import AutoModelForCausalLM

    import precompile

    src = checkpoint(family)
    prof = tmp_path / f"{family}.yaml"
    prof.write_text(WRITTEN_PROFILES[family])
    result = precompile.convert(str(src), tmp_path / "out", profile=str(prof), device="cpu")
    assert result.self_check is not None and result.self_check.passed
    enc = _batch()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = precompile.load(tmp_path / "out")
    want, got = _logits(ref, enc), _logits(model, enc)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    gen = _generate(ref, enc)
    assert len(set(gen[:, -16:].flatten().tolist())) > 2
    assert torch.equal(_generate(model, enc), gen)
