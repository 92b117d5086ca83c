"""`precompile plan` (the paper's accounting), `precompile profiles` and `convert --dry-run`.

The paper's figures (arXiv 2402.13388, Table 1) must come out exactly from configs with the paper's
parameters; real published configs check the whole-model count against the models' parameter counts;
the exact column and the dry run are checked against the files of a real conversion.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

import tiny
from conftest import run_cli, tree_snapshot
from precompile import UserError, convert
from precompile.cli import main
from precompile.plan.plan_report import parse_batch_sizes, plan_model

# Published config.json values and parameter counts of real models (copied from shared/reference).
REF = json.loads((Path(__file__).resolve().parents[1] / "data" / "model_configs.json").read_text())

# A minimal GPT-NeoX profile (parallel block, fused qkv, LayerNorm, two-layer MLP) for Pythia.
GPT_NEOX_YAML = (Path(__file__).resolve().parents[2] / "configs" / "gpt_neox.yaml").read_text()

# The paper's parameters (Pythia's vocab as the paper counts it: 50400).
PYTHIA = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 4096,
          "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 16384, "vocab_size": 50400,
          "layer_norm_eps": 1e-5, "hidden_act": "gelu", "use_parallel_residual": True,
          "tie_word_embeddings": False}
MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 32000, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "tie_word_embeddings": False}
MIXTRAL = {**MISTRAL, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8}


def invoke(*args):
    """The CLI in-process (a subprocess costs seconds of imports); run_cli covers the real entry point."""
    return CliRunner().invoke(main, [str(a) for a in args])


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def neox_profile(tmp_path) -> Path:
    return write(tmp_path / "gpt_neox.yaml", GPT_NEOX_YAML)


def by_batch(result: dict) -> dict[int, dict]:
    return {b["batch"]: b for b in result["batches"]}


# --- the paper's table ----------------------------------------------------------------------------------------

def test_pythia_reproduces_the_paper(tmp_path, neox_profile):
    r = plan_model(str(write(tmp_path / "config.json", PYTHIA)), profile=str(neox_profile))
    assert (r["block"], r["attention"], r["d"], r["head_dim"], r["q_width"], r["e"]) == \
        ("parallel", "MHA", 4096, 128, 4096, 4096)
    assert r["eliminated_weights"] == 184_549_376
    assert r["reads_with_per_token"] == 16_384
    b = by_batch(r)
    assert (b[1]["reads_without"], b[1]["reads_with"]) == (184_553_472, 16_384)
    assert [round(b[n]["reduction"]) for n in (1, 16, 256, 1024)] == [11_264, 704, 44, 11]
    assert (r["memory_increase"], r["memory_decrease"], r["memory_delta"]) == (619_315_200, 184_549_376,
                                                                               434_765_824)
    assert round(r["memory_delta_relative"] * 100) == 6
    assert round(r["total_weights"] / 1e8) == 69  # 6.9B by the paper's count
    assert "exact" not in r  # a bare config has no weights


def test_mistral_reproduces_the_paper(tmp_path):
    r = plan_model(str(write(tmp_path / "config.json", MISTRAL)))
    assert (r["block"], r["attention"], r["q_width"], r["e"]) == ("serial", "GQA", 4096, 1024)
    assert r["eliminated_weights"] == 25_165_824
    b = by_batch(r)
    assert (b[1]["reads_without"], b[1]["reads_with"]) == (25_169_920, 10_240)
    assert [round(b[n]["reduction"]) for n in (1, 16, 256, 1024)] == [2_458, 154, 10, 3]
    assert (r["memory_increase"], r["memory_decrease"], r["memory_delta"]) == (196_608_000, 25_165_824,
                                                                               171_442_176)
    assert round(r["memory_delta_relative"] * 100) == 2
    assert round(r["total_weights"] / 1e8) == 72
    assert r["ceiling"] == 1 / 32
    # at batch 1 a token reads every weight once, except that the embedding is one row
    assert 0 < r["batch1_reads_saved"] < r["ceiling"]


def test_mixtral_hypothetical_parallel_column(tmp_path):
    cfg = str(write(tmp_path / "config.json", MIXTRAL))
    serial = plan_model(cfg)
    assert serial["eliminated_weights"] == 25_165_824  # serial: the MoE FFN stays
    r = plan_model(cfg, assume_parallel=True)
    assert r["block"] == "parallel" and r["assume_parallel"] is True
    assert r["eliminated_weights"] == 25_165_824 + 8 * 3 * 4096 * 14336 == 1_434_451_968
    assert r["memory_delta"] == 196_608_000 - 1_434_451_968
    assert round(r["memory_delta_relative"] * 100) == -3
    assert round(r["total_weights"] / 1e9, 1) == 46.7
    assert [round(b["reduction"]) for b in r["batches"]] == [140_084, 8_756, 548, 137]


def test_cli_json_matches_the_library(tmp_path, neox_profile):
    cfg = write(tmp_path / "pythia.json", PYTHIA)
    out = tmp_path / "plan.json"
    res = run_cli("plan", cfg, "--profile", neox_profile, "--json", out, "--batch-sizes", "1,16,256,1024")
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    for key in ("block", "attention", "d", "head_dim", "q_width", "e", "n_layers", "vocab_size",
                "eliminated_weights", "reads_with_per_token", "batches", "memory_increase", "memory_decrease",
                "memory_delta", "total_weights", "memory_delta_relative"):
        assert key in data
    assert data == json.loads(json.dumps(plan_model(str(cfg), profile=str(neox_profile))))
    assert data["batches"][0] == {"batch": 1, "reads_without": 184_553_472, "reads_with": 16_384,
                                  "reduction": 184_553_472 / 16_384}
    assert "184,549,376" in res.stdout and "11,264x" in res.stdout


# --- real configs: the paper's count plus what it leaves out is the published parameter count ----------------

def ref_config(name: str) -> dict:
    r = REF[name]
    cfg = {k: r[k] for k in ("architectures", "model_type", "hidden_size", "num_hidden_layers",
                             "num_attention_heads", "intermediate_size", "vocab_size")}
    for k in ("num_key_value_heads", "head_dim", "tie_word_embeddings", "hidden_act", "use_parallel_residual"):
        if r.get(k) is not None:
            cfg[k] = r[k]
    cfg[r["norm_eps_field"]] = r["norm_eps"]
    if "moe" in r:
        cfg["num_local_experts"] = r["moe"]["num_local_experts"]
    return cfg


@pytest.mark.parametrize("name", ["mistralai/Mistral-7B-v0.1", "mistralai/Mixtral-8x7B-v0.1",
                                  "meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B",
                                  "meta-llama/Llama-3.1-405B", "google/gemma-2b", "google/gemma-7b",
                                  "Qwen/Qwen2-7B", "Qwen/Qwen2.5-0.5B", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                                  "HuggingFaceTB/SmolLM2-135M"])
def test_total_weights_against_published_parameter_counts(tmp_path, name):
    cfg = ref_config(name)
    r = plan_model(str(write(tmp_path / "config.json", cfg)))
    d, L = r["d"], r["n_layers"]
    extra = (2 * L + 1) * d  # RMSNorm weights: two per layer and the final one
    if cfg["model_type"] == "qwen2":
        extra += L * (r["q_width"] + 2 * r["e"])  # q/k/v biases
    if cfg["model_type"] == "mixtral":
        extra += L * r["n_experts"] * d  # routers
    # a tied head is counted once (the paper's count of an untied model has two [vocab, d] matrices)
    assert r["total_weights"] + extra == REF[name]["checkpoint"]["param_count"]


def test_real_head_widths_gemma_7b(tmp_path):
    r = plan_model(str(write(tmp_path / "config.json", ref_config("google/gemma-7b"))))
    assert (r["d"], r["head_dim"], r["q_width"], r["e"]) == (3072, 256, 4096, 4096)  # 16 x 256 != 3072
    assert r["eliminated_weights"] == 3072 * 4096 * 3
    assert r["reads_with_per_token"] == 3072 + 3 * 4096
    assert r["memory_increase"] == 3 * 4096 * 256_000


def test_real_pythia_config(tmp_path, neox_profile):
    r = plan_model(str(write(tmp_path / "config.json", ref_config("EleutherAI/pythia-6.9b"))),
                   profile=str(neox_profile))
    assert r["vocab_size"] == 50432 and r["block"] == "parallel"
    assert r["memory_increase"] == 12288 * 50432 and r["eliminated_weights"] == 184_549_376
    serial = plan_model(str(write(tmp_path / "config.json", {**PYTHIA, "use_parallel_residual": False})),
                        profile=str(neox_profile))
    assert serial["block"] == "serial" and serial["eliminated_weights"] == 3 * 4096 * 4096


# --- sources: hub id offline, converted OUT_DIR, local weights (exact column) --------------------------------

def test_hub_id_needs_only_config_json(tmp_path):
    (tmp_path / "src").mkdir()
    only_config = write(tmp_path / "src" / "config.json", MISTRAL)
    hf_home = tmp_path / "hf"
    tiny.lay_out_hub_cache(hf_home, "org/mistral-7b", only_config.parent)
    res = run_cli("plan", "org/mistral-7b", "--json", "-", env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["source_kind"] == "hub" and data["eliminated_weights"] == 25_165_824


def test_local_dirs_without_complete_weights(checkpoint, tmp_path):
    only_config = tmp_path / "cfg"
    only_config.mkdir()
    write(only_config / "config.json", MISTRAL)
    r = plan_model(str(only_config))
    assert r["source_kind"] == "local" and "exact" not in r and r["eliminated_weights"] == 25_165_824
    partial = tiny.copy_tree(checkpoint("llama"), tmp_path / "partial")
    next(partial.glob("model-0000[2-9]-*.safetensors")).unlink()
    r = plan_model(str(partial))
    assert "exact" not in r and "missing or incomplete model files" in r["exact_unavailable"]
    with pytest.raises(UserError, match="--revision applies to hub ids"):
        plan_model(str(partial), revision="main")


def tensor_bytes(path: Path) -> dict[str, int]:
    """name -> data bytes of every tensor in every safetensors file below path."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                sl = sf.get_slice(name)
                n = 1
                for s in sl.get_shape():
                    n *= s
                out[name] = n * {"F32": 4, "BF16": 2, "F16": 2}[sl.get_dtype()]
    return out


@pytest.mark.parametrize("family,dtype", [("llama", "float32"), ("llama_tied", "float32"), ("gemma", "bfloat16"),
                                          ("mixtral", "bfloat16")])
def test_exact_column_matches_a_real_conversion(checkpoint, tmp_path, family, dtype):
    src = checkpoint(family, dtype)
    r = plan_model(str(src))
    ex = r["exact"]
    out = tmp_path / "out"
    convert(str(src), out, device="cpu")
    manifest = json.loads((out / "precompile.json").read_text())
    real = tensor_bytes(out)
    source = tensor_bytes(src)
    table = manifest["table"]["tensor"]
    assert ex["table_shape"] == manifest["table"]["shape"] and ex["dtype"] == manifest["table"]["dtype"]
    assert ex["table_bytes"] == real[table]
    assert [t["name"] for t in ex["eliminated_tensors"]] == manifest["eliminated"]
    assert ex["eliminated_bytes"] == sum(source[n] for n in manifest["eliminated"])
    assert ex["source_weight_bytes"] == sum(source.values())
    assert ex["output_weight_bytes"] == sum(real.values())
    assert ex["memory_delta_bytes"] == sum(real.values()) - sum(source.values())
    assert ex["files"] == {n: (out / n).stat().st_size for n in ex["files"]}
    assert set(ex["files"]) == {p.name for p in out.glob("*.safetensors")}
    assert ex["embedding_kept"] == manifest["loader"]["keep_embedding"]
    # the paper's count from the same config, the exact count adds norms and biases
    assert ex["layer0_eliminated_weights"] >= r["eliminated_weights"]
    # the converted OUT_DIR plans like its source (from the config stored in precompile.json)
    again = plan_model(str(out))
    assert again["source_kind"] == "converted" and "exact" not in again
    assert {k: v for k, v in again.items() if k not in ("source", "source_kind", "verdict")} == \
        {k: v for k, v in r.items() if k not in ("source", "source_kind", "exact", "verdict")}
    assert again["verdict"] == r["paper_verdict"] and r["verdict"] == ex["verdict"]


def _reads_per_token(model, x_row: bool) -> int:
    """Bytes one token reads at batch 1 in a loaded model: every distinct parameter once (a tied head once),
    except that the input embedding (or the table) gives one row; x_row: a kept tied embedding also gives its
    row to the input."""
    import torch

    emb = model.get_input_embeddings()
    table = getattr(emb, "table", None)
    head = model.get_output_embeddings().weight
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        size = p.element_size()
        if table is not None and p is table:
            total += p.shape[1] * size
        elif p is getattr(emb, "weight", None) and p is not head:
            total += p.shape[1] * size  # an untied input embedding: one row
        else:
            total += p.numel() * size
    if table is not None and x_row or table is None and emb.weight is head:
        total += head.shape[1] * head.element_size()  # the input's row of the tied embedding
    assert all(b.dtype != torch.float64 for b in model.buffers())
    return total


@pytest.mark.parametrize("family,src_dtype,out_dtype", [("llama", "float32", "auto"), ("llama_tied", "float32", "auto"),
                                                        ("llama", "float32", "bfloat16"), ("gptj", "float32", "auto")])
def test_headline_against_the_files_and_the_reads_per_token(checkpoint, tmp_path, family, src_dtype, out_dtype):
    """plan's and the card's whole-model figures: memory against OUT_DIR's real tensor bytes and the source's
    converted to the output dtype; reads per token against the parameters the loaded models really hold. For an
    untied, a tied, a bfloat16-from-float32 and a parallel (FFN folded) conversion."""
    import torch
    from transformers import AutoModelForCausalLM

    import precompile
    from precompile.plan.trade import verdict_line

    src = checkpoint(family, src_dtype)
    r = plan_model(str(src), dtype=out_dtype)
    v = r["verdict"]
    out = tmp_path / "out"
    convert(str(src), out, device="cpu", dtype=out_dtype)
    manifest = json.loads((out / "precompile.json").read_text())
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[manifest["table"]["dtype"]]
    es = dt.itemsize
    with safe_open(next(src.glob("*.safetensors")), framework="pt") as f:
        assert f.get_slice(f.keys()[0]).get_dtype() == "F32"  # the source as stored
    source_numel = sum(n // 4 for n in tensor_bytes(src).values())
    assert v["unit"] == "bytes" and v["memory_before"] == source_numel * es  # the source in the output dtype
    assert v["memory_after"] == sum(tensor_bytes(out).values())
    assert v["memory_delta"] == v["memory_after"] - v["memory_before"]
    orig = AutoModelForCausalLM.from_pretrained(str(src), dtype=dt)
    conv = precompile.load(out, dtype=dt)
    x_row = manifest["loader"]["x_stop"] == 0
    assert v["reads_per_token_without"] == _reads_per_token(orig, False)
    assert v["reads_per_token_with"] == _reads_per_token(conv, x_row)
    assert v["reads_saved_batch1"] == pytest.approx(1 - v["reads_per_token_with"] / v["reads_per_token_without"])
    # the break-even batch: the layer-0 bytes no longer read over the bytes the table adds per token
    extra = manifest["table"]["shape"][1] * es - (0 if x_row else r["d"] * es)
    assert v["break_even_batch"] == pytest.approx(r["exact"]["layer0_eliminated_bytes"] / extra)
    # the same line in plan's text, its JSON and the card's headline (not in a collapsed block)
    res = invoke("plan", src, "--dtype", out_dtype)
    assert res.exit_code == 0 and verdict_line(v) in res.output
    card = (out / "README.md").read_text()
    line = verdict_line(v)
    assert f"**{line[0].upper()}{line[1:]}**" in card
    assert card.index(line[1:]) < card.index("<details>")
    assert "REPO_ID_OR_DIR" not in card and '"DIR"' not in card


def test_exact_bytes_of_a_tied_model(checkpoint):
    r = plan_model(str(checkpoint("llama_tied")))
    ex = r["exact"]
    # serial, tied, no scale: x is the stored row, so the table holds only q, k, v; the embedding stays
    assert ex["embedding_kept"] and not ex["x_in_table"]
    assert ex["table_bytes"] == r["memory_increase"] * 4
    assert "model.embed_tokens.weight" not in [t["name"] for t in ex["eliminated_tensors"]]
    # q/k/v biases and the input norm are in the exact count, not in the paper's
    assert ex["layer0_eliminated_weights"] == r["eliminated_weights"] + r["q_width"] + 2 * r["e"] + r["d"]


# --- the paper's count against the real layer 0 of every tested family ----------------------------------------

def _matrices(tensors: list[dict], vocab: int) -> int:
    """Weights in the weight matrices among `tensors` (not norm weights, Cohere's [heads, head_dim] ones included,
    biases or the [vocab, d] embedding)."""
    return sum(math.prod(t["shape"]) for t in tensors
               if len(t["shape"]) >= 2 and t["shape"][0] != vocab and "norm" not in t["name"].split(".")[-2])


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_eliminated_count_is_layer0s_weight_matrices(checkpoint, family):
    """The paper's count (config.json alone) is exactly the weight matrices the conversion of the real checkpoint
    eliminates: q/k/v (or the fused qkv, a latent attention's projections with their low-rank inputs, a mixer's
    input projection) and, in a parallel block, the FFN with its router, every expert and the shared one."""
    r = plan_model(str(checkpoint(family, shard_kb=None)))
    assert r["eliminated_weights"] == _matrices(r["exact"]["eliminated_tensors"], r["vocab_size"])
    # the table's width, less x where x takes an untied embedding's place (beside a kept tied one, x counts)
    assert r["memory_increase"] == r["vocab_size"] * (r["exact"]["table_shape"][1] - (
        r["d"] if r["exact"]["x_in_table"] and not r["exact"]["embedding_kept"] else 0))


# (family, the overrides that make its first layer(s) dense, those that make every layer a mixture of experts)
DENSE_FIRST = [("qwen2_moe", {"mlp_only_layers": [0]}, {}), ("qwen3_moe", {"decoder_sparse_step": 2}, {}),
               ("glm4_moe", {"first_k_dense_replace": 1}, {}), ("deepseek_v3", {"first_k_dense_replace": 1}, {}),
               ("exaone_moe", {"mlp_layer_types": ["dense", "sparse"]}, {}),
               ("ernie4_5_moe", {"moe_layer_start_index": 1}, {}), ("lfm2_moe", {"num_dense_layers": 1}, {}),
               ("glm4_moe_lite", {}, {"mlp_layer_types": ["sparse", "sparse"]})]


def _layer_parameters(model) -> dict[int, list[tuple[str, object]]]:
    out: dict[int, list] = {}
    for n, p in model.named_parameters():
        m = re.search(r"\.layers\.(\d+)\.(.*)", n)
        if m:
            out.setdefault(int(m.group(1)), []).append((m.group(2), p))
    return out


@pytest.mark.parametrize("family, dense, moe", DENSE_FIRST, ids=[f[0] for f in DENSE_FIRST])
def test_dense_layers_of_a_mixture_of_experts(checkpoint, family, dense, moe):
    """A mixture of experts whose first layer(s) have a dense FFN (first_k_dense_replace, mlp_only_layers,
    decoder_sparse_step, mlp_layer_types, ...): plan counts layer 0 and every dense layer as the real model builds
    them, and the conversion eliminates what plan says."""
    r = plan_model(str(checkpoint(family, shard_kb=None, **dense)))
    assert r["eliminated_weights"] == _matrices(r["exact"]["eliminated_tensors"], r["vocab_size"])
    layers = _layer_parameters(tiny.build_model(family, **dense))
    real_dense = [i for i, ps in sorted(layers.items()) if not any(".experts." in f".{n}" for n, _ in ps)]
    assert 0 in real_dense and len(real_dense) < len(layers)
    assert (r["dense_layers"], r["layer0_dense"]) == (len(real_dense), True)
    ffn = [sum(p.numel() for n, p in layers[i] if p.dim() == 2 and re.match(r"(mlp|feed_forward)\.", n))
           for i in real_dense]
    assert ffn == [3 * r["d"] * r["dense_ffn_hidden"]] * len(real_dense)
    text = invoke("plan", checkpoint(family, shard_kb=None, **dense)).stdout
    assert f"{len(real_dense)} of {r['n_layers']} layers dense" in text and "layer 0 dense" in text
    # the whole-model count: the same model with layer 0 a mixture of experts counts layer 0's experts instead
    r_moe = plan_model(str(checkpoint(family, shard_kb=None, **moe)))
    assert not r_moe["layer0_dense"]
    experts0 = sum(p.numel() for n, p in _layer_parameters(tiny.build_model(family, **moe))[0]
                   if p.dim() >= 2 and ".experts." in f".{n}")
    assert r_moe["total_weights"] - r["total_weights"] == experts0 - ffn[0]


def test_a_folded_mixture_of_experts_is_refused_where_layer_0_is_dense(checkpoint):
    """Cohere 2 MoE's parallel block folds layer 0's experts: a config whose layer 0 is dense (mlp_layer_types)
    is refused by name instead of looking for experts that are not there."""
    src = checkpoint("cohere2_moe", shard_kb=None, mlp_layer_types=["dense", "sparse"],
                     prefix_dense_intermediate_size=48)
    with pytest.raises(UserError, match="makes layer 0 dense"):
        plan_model(str(src))


@pytest.mark.parametrize("family, overrides", [("gptj", {"n_inner": None}), ("bloom", {})])
def test_ffn_width_by_default_is_four_times_hidden(checkpoint, family, overrides):
    """GPT-J with n_inner null and BLOOM (no key at all) have an FFN 4 x hidden wide: plan counts it, and the
    whole-model count is the model's weight matrices (the LM head counted once when tied)."""
    src = checkpoint(family, shard_kb=None, **overrides)
    r = plan_model(str(src))
    assert (r["ffn_hidden"], r["ffn_kind"]) == (4 * r["d"], "mlp")
    assert r["eliminated_weights"] == _matrices(r["exact"]["eliminated_tensors"], r["vocab_size"])
    model = tiny.build_model(family, **overrides)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # a tied head once
    assert r["total_weights"] == matrices


# --- output formats ---------------------------------------------------------------------------------------------

def test_markdown_and_plot(tmp_path, checkpoint):
    src = checkpoint("llama")
    png = tmp_path / "plan.png"
    res = invoke("plan", src, "--markdown", "--plot", png, "--batch-sizes", "4,1")
    assert res.exit_code == 0, res.output
    rows = [line for line in res.stdout.splitlines() if line.startswith("|")]
    assert rows[0].count("|") == 4  # quantity, paper, exact
    assert any(line.startswith("| batch 1: ") for line in rows) and any("| batch 4: " in line for line in rows)
    assert res.stdout.startswith("verdict: ")  # the same line as the text view and the card
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    cfg = write(tmp_path / "config.json", MISTRAL)
    res = invoke("plan", cfg, "--plot", tmp_path / "x.png")
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines() == [
        "error: --plot needs matplotlib, which is not installed; pip install 'precompile[plot]'"]
    assert not (tmp_path / "x.png").exists()


def test_profiles_command():
    res = invoke("profiles")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("supported (") and lines[1].split() == ["MODEL", "TYPE", "ARCHITECTURE", "PROFILE",
                                                                       "BLOCK"]
    rows = {cols[0]: cols[1:4] for cols in map(str.split, lines[2:lines.index("")])}
    assert rows["llama"] == ["LlamaForCausalLM", "llama", "serial"]
    assert rows["mixtral"] == ["MixtralForCausalLM", "mixtral", "serial"]
    assert any(line.startswith("  gpt2 ") and "absolute position" in line for line in lines)  # refused, with why
    assert any(line.startswith("not yet (") for line in lines)  # and what the schema lacks for the rest


def test_shipped_profiles_name_native_transformers_classes():
    """check_native trusts the shipped profiles' model types without importing transformers: they must be native."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from precompile.profiles.catalog import builtin_profiles

    for p in builtin_profiles():
        assert p.model_types and all(t in CONFIG_MAPPING for t in p.model_types), p.name
        assert all(hasattr(transformers, a) for a in p.architectures), p.name


def test_planning_a_shipped_family_does_not_import_transformers(tmp_path):
    """Start-up cost: `convert --dry-run` of a Mistral checkpoint never imports transformers (1.4 s on 2 cores)."""
    src = tiny.save_checkpoint(tiny.build_model("mistral"), tmp_path / "src")
    code = ("import sys; from precompile.plan.conversion_plan import plan_conversion; "
            f"plan_conversion({str(src)!r}); print('transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.stdout.strip() == "False"


# --- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "1,x", "0", "1,-4", "2.5"])
def test_bad_batch_lists(text):
    with pytest.raises(UserError, match="--batch-sizes"):
        parse_batch_sizes(text)


def test_batch_list_sorted_unique():
    assert parse_batch_sizes("256, 1,16,1") == (1, 16, 256)


@pytest.mark.parametrize("case,args,expect", [
    ("unknown", {**MISTRAL, "architectures": ["FooForCausalLM"], "model_type": "foo"}, "no profile for"),
    ("refused", {**MISTRAL, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "cannot be precompiled"),
    ("no hidden", {k: v for k, v in MISTRAL.items() if k != "hidden_size"}, "hidden_size"),
    ("no ffn", {k: v for k, v in MISTRAL.items() if k != "intermediate_size"}, "intermediate_size"),
    ("batch", MISTRAL, "--batch-sizes"),
    ("json", "{not json", "not valid JSON"),
    ("missing", None, "not found"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, case, args, expect):
    cfg = tmp_path / "config.json" if args is None else write(tmp_path / "config.json", args)
    extra = ["--batch-sizes", "1,,2"] if case == "batch" else []
    if case == "missing":
        cfg = tmp_path / "nope" / "config.json"
    res = invoke("plan", cfg, *extra, "--json", tmp_path / "out.json")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert "Traceback" not in res.stderr and not (tmp_path / "out.json").exists()


# --- convert --dry-run ----------------------------------------------------------------------------------------------

def test_dry_run_writes_nothing_and_agrees_with_the_conversion(checkpoint, tmp_path):
    src = checkpoint("llama", "bfloat16")
    before = tree_snapshot(src)
    work = tmp_path / "work"
    work.mkdir()
    res = run_cli("convert", src, work / "out", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert list(work.iterdir()) == [] and tree_snapshot(src) == before
    planned = dict((m.group(1), int(m.group(2).replace(",", "")))
                   for m in re.finditer(r"^  (\S+\.safetensors)  ([\d,]+) bytes", res.stdout, re.M))
    assert "precompile_table.safetensors" in planned and len(planned) >= 2
    table = re.search(r"^table: \[(\d+), (\d+)\] bfloat16", res.stdout, re.M)
    convert(str(src), work / "out", device="cpu")
    out = work / "out"
    real = {p.name: p.stat().st_size for p in out.glob("*.safetensors")}
    assert planned == real
    manifest = json.loads((out / "precompile.json").read_text())
    assert [int(table.group(1)), int(table.group(2))] == manifest["table"]["shape"]
    assert re.search(r"^eliminates: (.*)$", res.stdout, re.M).group(1) == ", ".join(manifest["eliminated"])
    total = re.search(r"tensor data ([\d,]+) bytes", res.stdout)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert int(total.group(1).replace(",", "")) == sum(tensor_bytes(out).values())
    assert index["metadata"]["total_size"] == sum(tensor_bytes(out).values())


def test_scaled_tied_embedding_leaves_x_out_of_the_table(checkpoint, tmp_path):
    """Gemma 3's embedding module scales its rows by sqrt(d) and stays for the tied head: the table drops x (it is
    narrower by the hidden size), the loader recomputes it as the module does, and float32 logits and greedy ids
    are transformers' own, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    import precompile

    src = checkpoint("gemma3_text", shard_kb=None, hidden_size=48)  # sqrt(48) is not a float32 integer
    r = plan_model(str(src))
    q, kv = r["q_width"], r["e"]
    assert r["exact"]["table_shape"] == [r["vocab_size"], q + 2 * kv] and not r["exact"]["x_in_table"]
    assert r["memory_increase"] == r["vocab_size"] * (q + 2 * kv)  # plan shows the smaller table
    dry = invoke("convert", src, tmp_path / "dry", "--dry-run")
    assert dry.exit_code == 0 and f"table: [{r['vocab_size']}, {q + 2 * kv}]" in dry.output
    out = tmp_path / "out"
    convert(str(src), out, device="cpu")
    m = json.loads((out / "precompile.json").read_text())
    assert [c["name"] for c in m["table"]["columns"]] == ["q", "k", "v"]
    assert m["table"]["shape"][1] == q + 2 * kv and m["loader"]["x_stop"] == 0
    assert m["loader"]["x_scale"] == 48 ** 0.5 and m["format_version"] == 2
    orig = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    conv = precompile.load(out).eval()
    ids = torch.randint(3, r["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(conv(ids).logits, orig(ids).logits)
        assert torch.equal(conv.generate(ids, max_new_tokens=8, do_sample=False),
                           orig.generate(ids, max_new_tokens=8, do_sample=False))


def test_profile_pick_from_raw_match_keys_is_the_validated_pick():
    """select_profile reads only the profiles whose YAML names the config's architectures or model type and
    parses only the one it picks: for every name a shipped profile matches, and for configs naming several,
    the pick is the one the parsed, validated profiles give (their Match is the raw keys, validated)."""
    from precompile.profiles.catalog import builtin_profiles, match_keys, select_profile

    shipped = builtin_profiles()
    for p in shipped:
        assert match_keys(p, "architectures") == p.definition.match.architectures, p.name
        assert match_keys(p, "model_types") == p.definition.match.model_types, p.name
    configs = [{"architectures": [a], "model_type": "unknown"} for p in shipped for a in p.architectures]
    configs += [{"model_type": t} for p in shipped for t in p.model_types]
    configs += [{"architectures": ["NoSuchForCausalLM", *p.architectures], "model_type": t}
                for p in shipped for t in p.model_types]
    for config in configs:
        assert select_profile(config).path == select_profile(config, shipped=shipped).path, config
    with pytest.raises(UserError, match="no profile for architecture NoSuchForCausalLM; supported: .*LlamaForCausalLM"):
        select_profile({"architectures": ["NoSuchForCausalLM"], "model_type": "no_such_type"})
