"""Foundation: convert serial RoPE families and load them; transformers itself is the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import precompile
import tiny
from conftest import load_shim, logits, rel_diff, tree_snapshot
from precompile.check.row_check import RowStats, check_rows

SERIAL = ["llama", "llama_tied", "mistral", "mixtral", "qwen2", "gemma"]


@pytest.mark.numeric
@pytest.mark.parametrize("family", SERIAL)
def test_float32_matches_transformers(family, checkpoint, tmp_path, batch):
    src = checkpoint(family, "float32")
    out = tmp_path / "out"
    precompile.convert(str(src), out, chunk_size=64)
    original = AutoModelForCausalLM.from_pretrained(src).eval()
    ref = logits(original, batch)
    gen_ref = original.generate(**batch, max_new_tokens=16, do_sample=False)
    for model in (precompile.load(out), load_shim(out).load(out)):
        assert type(model.get_input_embeddings()).__name__ == "TableEmbedding"
        assert rel_diff(ref, logits(model, batch)) <= 1e-5
        gen = model.generate(**batch, max_new_tokens=16, do_sample=False)
        assert torch.equal(gen, gen_ref)
    assert batch["attention_mask"][:, 0].min() == 0, "the batch must be left-padded"


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.numeric
@pytest.mark.parametrize("family", [f for f in SERIAL if f != "mixtral"])
def test_bfloat16_no_farther_from_float32_than_original(family, checkpoint, tmp_path, batch):
    src = checkpoint(family, "bfloat16")
    out = tmp_path / "out"
    precompile.convert(str(src), out)
    assert json.loads((out / "precompile.json").read_text())["table"]["dtype"] == "bfloat16"
    fp32 = logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), batch)
    bf16 = logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval(), batch)
    for model in (precompile.load(out), load_shim(out).load(out)):
        assert model.dtype == torch.bfloat16
        ours = logits(model, batch)
        assert _rms(ours, fp32) <= 1.02 * _rms(bf16, fp32)


@pytest.mark.numeric
def test_mixtral_bfloat16_layer0_attention(checkpoint, tmp_path, batch):
    """Router choices flip under any rounding, so MoE models compare layer 0's attention output."""
    src = checkpoint("mixtral", "bfloat16")
    out = tmp_path / "out"
    precompile.convert(str(src), out)

    def attn_out(model):
        got = {}

        def keep(module, args, output) -> None:
            got["o"] = output[0]

        h = model.model.layers[0].self_attn.register_forward_hook(keep)
        with torch.no_grad():
            model(**batch)
        h.remove()
        mask = batch["attention_mask"].bool()
        return got["o"].float()[mask]

    fp32 = attn_out(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval())
    bf16 = attn_out(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval())
    ours = attn_out(precompile.load(out))
    assert _rms(ours, fp32) <= 1.02 * _rms(bf16, fp32)


def _param_counts(path: Path) -> dict[str, int]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    counts = {}
    for name, fname in index["weight_map"].items():
        with safe_open(path / fname, framework="pt") as f:
            shape = f.get_slice(name).get_shape()
        n = 1
        for s in shape:
            n *= s
        counts[name] = n
    return counts


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2", "gemma"])
def test_output_layout_and_parameter_arithmetic(family, checkpoint, tmp_path):
    src = checkpoint(family, "float32")
    out = tmp_path / "out"
    precompile.convert(str(src), out)
    manifest = json.loads((out / "precompile.json").read_text())
    cfg = tiny.make_config(family)
    d, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    tied = cfg.tie_word_embeddings
    x_in_table = not tied  # a tied embedding is kept: x is its row (Gemma: times the module's scale), not stored
    width = (d if x_in_table else 0) + (heads + 2 * kv) * head_dim
    assert manifest["table"]["shape"] == [tiny.VOCAB, width]

    src_counts = _param_counts(src)
    out_counts = _param_counts(out)
    eliminated = set(manifest["eliminated"])
    expect_gone = {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"} | {
        "model.layers.0.input_layernorm.weight"}
    if family in ("llama_tied", "qwen2"):
        expect_gone |= {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"}
    if not tied:
        expect_gone.add("model.embed_tokens.weight")
    assert eliminated == expect_gone
    guard = manifest["table"]["guard"]  # an eliminated name, kept as one element so plain transformers stops
    assert guard == "model.layers.0.self_attn.q_proj.weight" and out_counts[guard] == 1
    assert not (eliminated - {guard}) & set(out_counts)
    table_name = manifest["table"]["tensor"]
    assert out_counts[table_name] == tiny.VOCAB * width
    assert sum(out_counts.values()) == sum(src_counts.values()) - sum(src_counts[n] for n in eliminated) + \
        tiny.VOCAB * width + 1
    if tied:  # the head stays bound to the real embedding, which is kept
        model = precompile.load(out)
        assert model.lm_head.weight is model.get_input_embeddings().weight
        with safe_open(src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][
                "model.embed_tokens.weight"], framework="pt") as f:
            assert torch.equal(model.lm_head.weight.detach(), f.get_tensor("model.embed_tokens.weight"))
    else:
        emb = precompile.load(out).get_input_embeddings()  # `.weight` is only a view of the table's x columns
        assert "weight" not in dict(emb.named_parameters()) and emb.weight.data_ptr() == emb.table.data_ptr()


def test_inputs_embeds_is_refused_and_rows_are_cleared(checkpoint, tmp_path, batch):
    out = tmp_path / "out"
    precompile.convert(str(checkpoint("llama")), out)
    model = precompile.load(out)
    emb = model.get_input_embeddings()
    with torch.no_grad():
        model(**batch)
        assert emb._kept.rows is None, "layer 0 must release the looked-up rows"
        with pytest.raises(RuntimeError, match="needs input_ids"):
            model(inputs_embeds=torch.zeros(1, 3, 64))


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt_neox"])
def test_plain_transformers_cannot_mistake_out_dir(family, checkpoint, tmp_path, batch):
    """config.json holds the original model type (for AutoTokenizer): the table file's guard, an eliminated
    layer-0 weight's name with one element, makes plain loading stop instead of running random weights."""
    src = checkpoint(family)
    out = tmp_path / "out"
    precompile.convert(str(src), out)
    assert AutoConfig.from_pretrained(out).model_type == AutoConfig.from_pretrained(src).model_type
    with pytest.raises(ValueError, match=r"trust_remote_code=True\)"):  # config.json's transformers_weights
        AutoModelForCausalLM.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["transformers_weights"]  # without it, the guard still stops plain loading
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ref = logits(AutoModelForCausalLM.from_pretrained(src).eval(), batch)
    assert rel_diff(ref, logits(model, batch)) <= 1e-5


def test_shim_alone_in_a_fresh_interpreter(checkpoint, tmp_path, batch):
    """OUT_DIR loads with only torch/safetensors/transformers: importing this package is blocked."""
    src = checkpoint("qwen2")
    out = tmp_path / "out"
    precompile.convert(str(src), out)
    ids = tmp_path / "ids.pt"
    torch.save({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, ids)
    code = (
        "import sys, torch\n"
        "sys.modules['precompile'] = None  # any import of the package now raises ImportError\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('precompile_loader', {str(out / 'precompile_loader.py')!r})\n"
        "shim = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(shim)\n"
        "load = shim.load\n"
        f"enc = torch.load({str(ids)!r})\n"
        "m = load()\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(**enc).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ref = logits(AutoModelForCausalLM.from_pretrained(src).eval(), batch)
    assert rel_diff(ref, torch.load(tmp_path / "logits.pt").float()) <= 1e-5


def test_hub_id_from_offline_cache(checkpoint, tmp_path, cli):
    src = checkpoint("mistral")
    hf_home = tmp_path / "hf"
    tiny.lay_out_hub_cache(hf_home, "tiny-org/tiny-mistral", src)
    before = tree_snapshot(hf_home)
    out = tmp_path / "out"
    r = cli("convert", "tiny-org/tiny-mistral", out, env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "profile: mistral (serial block, GQA: 4 heads, 2 kv heads" in r.stderr
    manifest = json.loads((out / "precompile.json").read_text())
    assert manifest["source"]["id"] == "tiny-org/tiny-mistral"
    assert manifest["source"]["revision"] == "0" * 40
    assert tree_snapshot(hf_home) == before
    r = cli("convert", "tiny-org/not-there", tmp_path / "out2", env={"HF_HOME": str(hf_home)})
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()


@pytest.mark.numeric
def test_same_input_and_options_give_identical_bytes(checkpoint, tmp_path):
    """The promise on one machine: the same source and options give the same bytes (README: Determinism)."""
    src = checkpoint("gemma", "bfloat16")
    precompile.convert(str(src), tmp_path / "a", chunk_size=7)
    precompile.convert(str(src), tmp_path / "b", chunk_size=7)
    a, b = tree_snapshot(tmp_path / "a"), tree_snapshot(tmp_path / "b")
    assert {k: v[2] for k, v in a.items()} == {k: v[2] for k, v in b.items()}


def _table_rows_within_bound(out: Path) -> RowStats:
    """Every row of OUT_DIR's table against float64, within rowcheck's derived rounding bound."""
    from precompile.plan.conversion_plan import plan_conversion

    manifest = json.loads((out / "precompile.json").read_text())
    plan = plan_conversion(manifest["source"]["path"], dtype=manifest["options"]["dtype"])
    ckpt = plan.checkpoint
    w64 = {n: ckpt.get(n).double() for n in plan.read_tensors[1:]}
    with safe_open(out / manifest["table"]["file"], framework="pt") as f:
        table = f.get_slice(manifest["table"]["tensor"])
        return check_rows(plan.spec, plan.layout, lambda a, b: ckpt.rows(plan.spec.embedding_tensor, a, b),
                          lambda a, b: table[a:b], w64, None, plan.model_dtype, plan.compute_dtype)


@pytest.mark.numeric
@pytest.mark.parametrize("family", ["gemma", "gpt_neox"])
def test_chunk_sizes_agree_within_the_rounding_bound(family, checkpoint, tmp_path):
    """Across chunk sizes (and CPUs) matrix kernels round differently: every row of either table is within
    the rounding bound of float64, and every other file is the same but for the table's hash."""
    src = checkpoint(family, "bfloat16")
    precompile.convert(str(src), tmp_path / "a")
    precompile.convert(str(src), tmp_path / "b", chunk_size=7)
    for out in ("a", "b"):
        stats = _table_rows_within_bound(tmp_path / out)
        assert stats.checked == tiny.VOCAB and not stats.failed_ids, (out, stats)
    a, b = tree_snapshot(tmp_path / "a"), tree_snapshot(tmp_path / "b")
    table, manifest = "precompile_table.safetensors", "precompile.json"
    assert {k: v[2] for k, v in a.items() if k not in (table, manifest)} == \
        {k: v[2] for k, v in b.items() if k not in (table, manifest)}
    ma, mb = (json.loads(x[manifest][2]) for x in (a, b))
    for m in (ma, mb):
        m["outputs"].pop(table)
    assert ma == mb


@pytest.mark.numeric
def test_dtype_option_converts_every_float_tensor(checkpoint, tmp_path, batch):
    src = checkpoint("llama", "float32")
    out = tmp_path / "out"
    precompile.convert(str(src), out, dtype="bfloat16")
    for name, fname in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].items():
        with safe_open(out / fname, framework="pt") as f:
            assert f.get_slice(name).get_dtype() == "BF16", name
    model = precompile.load(out)
    fp32 = logits(AutoModelForCausalLM.from_pretrained(src).eval(), batch)
    bf16 = logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval(), batch)
    assert _rms(logits(model, batch), fp32) <= 1.02 * _rms(bf16, fp32)


def test_progress_output_modes(checkpoint, tmp_path, cli):
    src = checkpoint("llama")
    r = cli("convert", src, tmp_path / "a", "--chunk-size", "50")
    assert r.returncode == 0, r.stderr
    assert "computing table: 5/5 chunks done" in r.stderr and "\r" not in r.stderr
    r = cli("convert", src, tmp_path / "b", "--quiet")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
