"""A converted model is a transformers model (issue 24): save/push round trip, every from_pretrained argument,
device maps, fine-tuning (frozen table, PEFT LoRA, gradient checkpointing), resize, the plain-load guard.
Each is compared with the original model run by transformers."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import precompile
import tiny
from conftest import logits, rel_diff
from precompile.check.file_checks import check_outputs
from precompile.check.verify import verify
from precompile.loader import MANIFEST, PLAIN_LOAD_MESSAGE, RESIZE_MESSAGE, Manifest

FAMILIES = {"serial": "llama", "parallel": "gpt_neox", "moe": "mixtral", "tied": "llama_tied"}
REL = 1e-5  # float32: the converted model matches the original to rounding (tests/test_convert.py)


@pytest.fixture
def conv(converted_family):
    """conv(family) -> (source, OUT_DIR), converted once per session (conftest)."""
    return converted_family


def _remote(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw)


# --- save / reload / push --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(FAMILIES))
def test_save_reload_gives_the_same_logits(kind, conv, batch, tmp_path):
    src, out = conv(FAMILIES[kind])
    model = _remote(out)
    model.save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "precompile_loader.PrecompiledForCausalLM"
    assert cfg["transformers_weights"] == PLAIN_LOAD_MESSAGE
    manifest = Manifest.read(saved)
    assert manifest.saved["changed"] == [] and manifest.saved["from"] == str(out)
    assert manifest.table.guard in json.loads((saved / "model.safetensors.index.json").read_text())["weight_map"]
    assert check_outputs(saved, manifest).passed
    reloaded = _remote(saved)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))  # the same tensors and code
    ref = logits(AutoModelForCausalLM.from_pretrained(src).eval(), batch)
    assert rel_diff(ref, logits(reloaded, batch)) <= REL
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(saved)


def test_resaved_dir_passes_verify_and_a_fine_tuned_one_says_why_not(conv, batch, tmp_path):
    src, out = conv("llama")
    model = precompile.load(out)
    model.save_pretrained(tmp_path / "same")
    tok = AutoTokenizer.from_pretrained(out)
    tok.save_pretrained(tmp_path / "same")  # as for any transformers model: the tokenizer is saved on its own
    r = verify(tmp_path / "same", prompts=tiny.PROMPTS, max_new_tokens=4, rows=0)
    assert r["passed"], [c for c in r["checks"] if not c["passed"]]
    assert {c["name"]: c["passed"] for c in r["checks"]}["saved"] is True
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)  # a full fine-tune of layers 1..n, in one step
    model.save_pretrained(tmp_path / "tuned")
    tok.save_pretrained(tmp_path / "tuned")
    manifest = Manifest.read(tmp_path / "tuned")
    assert manifest.saved["changed"] == ["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(logits(precompile.load(tmp_path / "tuned"), batch), logits(model, batch))
    r = verify(tmp_path / "tuned", prompts=tiny.PROMPTS, max_new_tokens=4, rows=0)
    saved = next(c for c in r["checks"] if c["name"] == "saved")
    assert not r["passed"] and not saved["passed"] and "no longer a conversion" in saved["metrics"]["note"]


def test_merged_lora_saves_and_reloads(conv, batch, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, out = conv("llama")
    model = get_peft_model(precompile.load(out), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    changed = Manifest.read(tmp_path / "merged").saved["changed"]
    assert changed and all(".layers.0." not in n for n in changed)
    assert torch.equal(logits(precompile.load(tmp_path / "merged"), batch), logits(merged, batch))


class _LocalHub:
    """hf_api() stand-in: create_repo/create_commit write into a folder, never the network."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, **_kw):
        return types.SimpleNamespace(repo_id=repo_id)

    def create_branch(self, **_kw):
        pass

    def create_commit(self, repo_id, operations, **_kw):
        for op in operations:
            dest = self.root / repo_id / op.path_in_repo
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(Path(op.path_or_fileobj).read_bytes())


@pytest.mark.parametrize("how", ["push_to_hub", "save_pretrained(push_to_hub=True)"])
def test_push_to_hub_reloads_the_same_from_a_hub_snapshot(how, conv, batch, tmp_path, monkeypatch, offline):
    import transformers.utils.hub as th

    _, out = conv("llama")
    monkeypatch.setattr(th, "_hf_api", _LocalHub(tmp_path / "pushed"))
    monkeypatch.setattr(th, "create_and_tag_model_card", lambda *a, **k: ModelCard("# pushed\n"))
    model = precompile.load(out)
    if how == "push_to_hub":
        model.push_to_hub("me/pushed")
    else:
        model.save_pretrained(tmp_path / "work", push_to_hub=True, repo_id="me/pushed")
    folder = tmp_path / "pushed" / "me" / "pushed"
    assert Manifest.read(folder).table.guard
    tiny.lay_out_hub_cache(tmp_path / "home", "me/pushed", folder, "e" * 40)
    cache = tmp_path / "home" / "hub"
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained("me/pushed", cache_dir=cache, local_files_only=True)
    reloaded = _remote("me/pushed", cache_dir=cache, local_files_only=True)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


# --- from_pretrained arguments ---------------------------------------------------------------------------------------

LAYERS = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm",
          "model.rotary_emb", "lm_head"]
ARGUMENTS = {
    "device_map=auto": dict(device_map="auto"),
    "device_map=cpu": dict(device_map="cpu"),
    "device_map=dict": dict(device_map={"": "cpu"}),
    "device_map=int": dict(device_map=0),  # without an accelerator: the same error as the original's
    "device_map=modules": dict(device_map=dict.fromkeys(LAYERS, "cpu")),
    "device_map=offload": dict(device_map={**dict.fromkeys(LAYERS, "cpu"), "model.embed_tokens": "disk",
                                           "model.layers.1": "disk"}),
    "attn_implementation": dict(attn_implementation="eager"),
    "output_loading_info": dict(output_loading_info=True),
    "dtype": dict(dtype=torch.bfloat16),
    "torch_dtype": dict(torch_dtype="bfloat16"),
    "dtype=auto": dict(dtype="auto"),
    "low_cpu_mem_usage": dict(low_cpu_mem_usage=True),
    "revision": dict(revision="main"),
    "local_files_only": dict(local_files_only=True),
    "config override": dict(output_hidden_states=True),
    "unknown": dict(not_an_argument=1),
}


def _describe(result) -> dict:
    model = result[0] if isinstance(result, tuple) else result
    return {"tuple": isinstance(result, tuple), "attn": model.config._attn_implementation, "dtype": model.dtype,
            "devices": sorted({str(p.device) for p in model.parameters()} - {"meta"}),
            "map": getattr(model, "hf_device_map", None), "hidden": model.config.output_hidden_states,
            "info": sorted(result[1]) if isinstance(result, tuple) else None}


@pytest.mark.parametrize("row", list(ARGUMENTS))
def test_from_pretrained_argument_as_on_the_original(row, conv, batch, tmp_path):
    src, out = conv("llama")
    kw = dict(ARGUMENTS[row])
    if "offload" in row:
        kw["offload_folder"] = str(tmp_path / "offload")
    try:
        want = AutoModelForCausalLM.from_pretrained(src, **kw)
    except Exception as e:  # noqa: BLE001 - the converted model must fail the same way
        with pytest.raises(type(e)):
            _remote(out, **kw)
        return
    got = _remote(out, **kw)
    assert _describe(got) == _describe(want)
    w, g = (r[0] if isinstance(r, tuple) else r for r in (want, got))
    ref, mine = logits(w, batch), logits(g, batch)
    if w.dtype == torch.float32:
        assert rel_diff(ref, mine) <= REL
    else:  # bfloat16: no farther from float32 than the original is (tests/test_convert.py), with slack
        f32 = logits(AutoModelForCausalLM.from_pretrained(src), batch)
        assert (mine - f32).abs().max() <= 2 * (ref - f32).abs().max() + 1e-2


def test_refused_arguments_are_one_line(conv):
    _, out = conv("llama")
    for name, value in (("quantization_config", {"quant_method": "bitsandbytes", "load_in_8bit": True}),
                        ("state_dict", {"x": torch.zeros(1)}), ("tp_plan", "auto")):
        with pytest.raises(RuntimeError, match=rf"^from_pretrained\({name}=\.\.\.\) is not supported") as e:
            _remote(out, **{name: value})
        assert "\n" not in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("device_map", ["auto", 0, "modules"])
def test_device_map_on_a_gpu(device_map, conv, batch):
    src, out = conv("llama")
    dm = {**dict.fromkeys(LAYERS, 0), "model.layers.1": "cpu"} if device_map == "modules" else device_map
    want, got = AutoModelForCausalLM.from_pretrained(src, device_map=dm), _remote(out, device_map=dm)
    assert got.hf_device_map == want.hf_device_map
    assert got.get_input_embeddings().table.device == want.get_input_embeddings().weight.device
    enc = {k: v.to(want.device) for k, v in batch.items()}
    assert rel_diff(logits(want, enc), logits(got, enc)) <= 1e-4  # GPU kernels: TF32 may be on


# --- plain transformers never yields a wrong model -------------------------------------------------------------------

@pytest.mark.parametrize("flags", [{}, {"ignore_mismatched_sizes": True}, {"use_safetensors": True},
                                   {"low_cpu_mem_usage": True}, {"device_map": "cpu"}])
def test_plain_loading_names_trust_remote_code(flags, conv):
    _, out = conv("llama")
    assert AutoConfig.from_pretrained(out).model_type == "llama"
    AutoTokenizer.from_pretrained(out)
    with pytest.raises(ValueError, match=r"trust_remote_code=True\) or precompile\.load"):
        AutoModelForCausalLM.from_pretrained(out, **flags)


# --- fine-tuning -----------------------------------------------------------------------------------------------------

def _step(model, ids, params) -> tuple[float, float]:
    """Loss, one AdamW step, loss again."""
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids).loss
    return loss.item(), after.item()


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "llama_tied"])
def test_lora_with_the_usual_targets_steps_like_the_original(family, conv, batch):
    """target_modules=["q_proj", "v_proj"] (or the family's fused qkv) adapts layers 1..n of the converted model:
    layer 0's projections are lookups, which LoRA skips; the original with the same adapters (layers 1..n)
    takes the same step."""
    from peft import LoraConfig, get_peft_model

    src, out = conv(family)
    targets = ["query_key_value"] if family == "gpt_neox" else ["q_proj", "v_proj"]
    n = AutoConfig.from_pretrained(src).num_hidden_layers
    torch.manual_seed(0)
    orig = get_peft_model(AutoModelForCausalLM.from_pretrained(src),
                          LoraConfig(r=4, target_modules=targets, layers_to_transform=list(range(1, n))))
    torch.manual_seed(0)
    mine = get_peft_model(precompile.load(out), LoraConfig(r=4, target_modules=targets))
    names = [k for k, _ in mine.named_parameters() if "lora_" in k]
    assert names == [k for k, _ in orig.named_parameters() if "lora_" in k] and names
    assert not any(".layers.0." in k for k in names)
    a, b = _step(orig, batch["input_ids"], _trainable(orig)), _step(mine, batch["input_ids"], _trainable(mine))
    assert a == pytest.approx(b, rel=REL)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_like_the_original(reentrant, conv, batch):
    """Full fine-tune of layers 1..n with gradient checkpointing: the loss and the step equal the original's
    with layer 0 and the embedding frozen (what the table fixes)."""
    src, out = conv("llama")
    models = [AutoModelForCausalLM.from_pretrained(src), precompile.load(out)]
    for m in models:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        m.model.embed_tokens.requires_grad_(False)
        m.model.layers[0].requires_grad_(False)
        if reentrant:
            m.enable_input_require_grads()
    a, b = (_step(m, batch["input_ids"], _trainable(m)) for m in models)
    assert a == pytest.approx(b, rel=REL)


def test_table_is_frozen(conv, batch):
    _, out = conv("llama")
    model = _remote(out)
    table = model.get_input_embeddings().table
    assert not table.requires_grad
    model.train()
    assert not table.requires_grad
    model.requires_grad_(True)  # a full fine-tune: everything trainable, the table still gets no gradient
    model.train()
    assert not table.requires_grad
    model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
    assert table.grad is None and model.lm_head.weight.grad is not None


def test_resize_token_embeddings_is_one_line(conv):
    _, out = conv("llama")
    model = precompile.load(out)
    with pytest.raises(NotImplementedError) as e:
        model.resize_token_embeddings(300)
    assert str(e.value) == RESIZE_MESSAGE and "\n" not in RESIZE_MESSAGE and "convert it again" in RESIZE_MESSAGE


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_embedding_weight_device_and_dtype_tied_or_not(family, conv):
    """Model code that reads embed_tokens.weight.device/.dtype (Llama 4's forward) finds the table's."""
    _, out = conv(family)
    model = precompile.load(out, dtype="bfloat16")
    emb = model.get_input_embeddings()
    assert emb.weight.device == emb.table.device and emb.weight.dtype == torch.bfloat16
    assert ("weight" in dict(emb.named_parameters())) == (family == "llama_tied")


def test_manifest_of_a_save_records_where_it_came_from(conv, tmp_path):
    _, out = conv("llama")
    precompile.load(out).save_pretrained(tmp_path / "s")
    data = json.loads((tmp_path / "s" / MANIFEST).read_text())
    original = json.loads((out / MANIFEST).read_text())
    assert data["source"] == original["source"] and data["profile"] == original["profile"]
    assert data["table"]["columns"] == original["table"]["columns"] and data["saved"]["by"] == "save_pretrained"


# --- a forward that reads the embedding's weight: Llama 4 -----------------------------------------------------------

def _llama4(tmp_path: Path, wrong: bool = False) -> tuple[Path, Path]:
    """A tiny Llama 4 text model (its forward reads `embed_tokens.weight.device`; layer 0 dense, RoPE) and a
    profile written here from llama.yaml (Llama 4 is not in configs/); `wrong` swaps k and v."""
    import yaml

    cfg = AutoConfig.for_model("llama4_text", hidden_size=64, intermediate_size=48, intermediate_size_mlp=96,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                               vocab_size=tiny.VOCAB, max_position_embeddings=256, num_local_experts=2,
                               interleave_moe_layer_step=2, attention_chunk_size=64, tie_word_embeddings=False,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg)
    tiny.randomize(model, 0)
    src = tmp_path / "src"
    tiny.save_checkpoint(model, src, torch.float32, None)
    prof = yaml.safe_load((Path(precompile.__file__).parent.parent / "configs" / "llama.yaml").read_text())
    prof.update(name="llama4_text_test", match={"architectures": ["Llama4ForCausalLM"], "model_types": ["llama4_text"]})
    prof["sizes"]["intermediate_size"] = ["intermediate_size_mlp"]
    prof["ffn"].update({k: prof["ffn"][k].replace(".mlp.", ".feed_forward.") for k in ("gate", "up", "down")},
                       module="model.layers.0.feed_forward")
    if wrong:
        k, v = prof["projections"][1], prof["projections"][2]
        k["weight"], v["weight"] = v["weight"], k["weight"]
    (tmp_path / "llama4.yaml").write_text(yaml.safe_dump(prof))
    return src, tmp_path / "llama4.yaml"


def test_llama4_reads_the_embedding_weight_and_runs(tmp_path, batch):
    src, prof = _llama4(tmp_path)
    out = tmp_path / "out"
    result = precompile.convert(str(src), out, profile=str(prof), device="cpu")
    assert all(p.passed for p in result.self_check.points)
    ref = logits(AutoModelForCausalLM.from_pretrained(src), batch)
    assert rel_diff(ref, logits(precompile.load(out), batch)) <= REL


def test_a_failing_self_check_reports_real_figures(tmp_path):
    """The self-check runs on the meta device and reads weights as modules run; Llama 4 reads the embedding's
    weight first, which used to feed the run no data (figures like 3.4e+38 against 1e-313)."""
    import re

    from precompile.errors import VerificationError

    src, prof = _llama4(tmp_path, wrong=True)
    with pytest.raises(VerificationError) as e:
        precompile.convert(str(src), tmp_path / "out", profile=str(prof), device="cpu")
    msg = str(e.value)
    assert "residual input" not in msg, msg  # the embedding rows themselves agree
    figures = [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e[+-]?\d+)?", msg.split("profile")[0])]
    assert figures and all(1e-30 < abs(f) < 1e3 for f in figures if f != 0), msg


def test_a_changed_expert_is_named_as_the_files_name_it(conv, tmp_path):
    """transformers fuses Mixtral's experts in memory and saves them per expert: `saved.changed` compares the
    files, so it names the tensors as the checkpoint does."""
    _, out = conv("mixtral")
    model = precompile.load(out)
    experts = model.model.layers[1].mlp.experts
    name, param = next((n, p) for n, p in experts.named_parameters())
    with torch.no_grad():
        param.add_(0.5)
    model.save_pretrained(tmp_path / "s")
    changed = Manifest.read(tmp_path / "s").saved["changed"]
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())["weight_map"]
    assert changed and all(n in index and ".layers.1." in n for n in changed), (name, changed)


def test_an_overlay_saves_as_a_full_conversion(checkpoint, batch, tmp_path):
    src = checkpoint("llama")
    precompile.convert(str(src), tmp_path / "overlay", overlay=True, device="cpu")
    model = precompile.load(tmp_path / "overlay")
    model.save_pretrained(tmp_path / "saved")
    manifest = Manifest.read(tmp_path / "saved")
    assert manifest.kind == "full" and manifest.saved["changed"] == [] and manifest.source.path == str(src)
    assert torch.equal(logits(precompile.load(tmp_path / "saved"), batch), logits(model, batch))
