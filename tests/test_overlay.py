"""Overlay outputs: convert reading only layer 0's files, load over the base, materialize, refuse a changed base."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from conftest import run_cli, run_cli_here

import precompile
from precompile import PrecompileLoadError
from precompile.loader import BaseMismatchError

REPO = "org/tiny-llama"
REV = "a" * 40
OTHER_REV = "b" * 40
# What computing a llama table reads (the trick itself, written out independently of the code under test).
LAYER0 = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
          "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
          "model.layers.0.self_attn.v_proj.weight"]


def weight_map(src: Path) -> dict[str, str]:
    return tiny.read_json(src / "model.safetensors.index.json")["weight_map"]


def layer0_files(src: Path) -> set[str]:
    wm = weight_map(src)
    return {wm[n] for n in LAYER0}


def layer0_module_files(src: Path) -> set[str]:
    """The shards holding any of layer 0's tensors: what the table needs, plus what the self-check runs."""
    wm = weight_map(src)
    return layer0_files(src) | {f for n, f in wm.items() if n.startswith("model.layers.0.")}


def make_cache(hf_home: Path, src: Path, files: set[str] | None = None, revision: str = REV) -> Path:
    """An HF cache holding REPO at `revision`: every file of src, or only the non-weight ones plus `files`."""
    stage = hf_home.parent / f"stage-{revision[:4]}"
    stage.mkdir(parents=True)
    for f in src.iterdir():
        if files is None or not f.name.endswith(".safetensors") or f.name in files:
            shutil.copy2(f, stage / f.name)
    snap = tiny.lay_out_hub_cache(hf_home, REPO, stage, revision)
    shutil.rmtree(stage)
    return snap


@pytest.fixture(scope="module")
def base(checkpoint) -> Path:
    src = checkpoint("llama")  # 17 shards of 40 KB: layer 0's tensors sit in 3 of them
    assert len(set(weight_map(src).values())) > len(layer0_files(src)) + 2
    return src


class ReadRecorder:
    """Wraps the safe_open transformers uses, recording which files it opens and which tensors it reads."""

    def __init__(self, real):
        self.real, self.opened, self.read = real, [], set()

    def __call__(self, file, *args, **kwargs):
        self.opened.append(os.path.realpath(file))
        handle, rec = self.real(file, *args, **kwargs), self

        class Slice:
            def __init__(self, key):
                self.key, self.inner = key, handle.get_slice(key)

            def __getitem__(self, item):
                rec.read.add(self.key)
                return self.inner[item]

            def __getattr__(self, name):
                return getattr(self.inner, name)

        class Handle:
            def get_slice(self, key):
                return Slice(key)

            def __getattr__(self, name):
                return getattr(handle, name)

        return Handle()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_overlay_fetches_only_layer0_files(base, tmp_path, hub):
    """Cache with only config, tokenizer, index and layer 0's shards: overlay works, full convert names the gap.

    The manifest records the files the table was computed from; the self-check also reads the rest of layer 0."""
    snap = make_cache(hub, base, layer0_module_files(base))
    out = tmp_path / "ov"
    precompile.convert(REPO, out, overlay=True, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["precompile_table.safetensors", "precompile.json", "config.json", "precompile_loader.py",
         "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"])
    m = tiny.read_json(out / "precompile.json")
    assert m["kind"] == "overlay" and m["source"]["id"] == REPO and m["source"]["revision"] == REV
    assert sorted(f for f in m["source"]["files"] if f.endswith(".safetensors")) == sorted(layer0_files(base))
    assert set(m["eliminated"]) == set(LAYER0)

    r = run_cli("convert", REPO, tmp_path / "full", "--device", "cpu", env={"HF_HOME": str(hub)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and "--overlay" in lines[0], r.stderr
    missing = sorted(set(weight_map(base).values()) - layer0_module_files(base))
    assert missing[0] in lines[0]
    assert not (tmp_path / "full").exists() and not list(tmp_path.glob(".precompile-tmp-*"))
    assert sorted(p.name for p in snap.iterdir() if p.name.endswith(".safetensors")) == \
        sorted(layer0_module_files(base))


def test_overlay_loads_over_hub_base_without_reading_eliminated_tensors(base, tmp_path, hub, monkeypatch):
    snap = make_cache(hub, base)
    out = tmp_path / "ov"
    precompile.convert(REPO, out, overlay=True, device="cpu")
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    import transformers.modeling_utils as mu

    rec = ReadRecorder(mu.safe_open)
    with monkeypatch.context() as mp:
        mp.setattr(mu, "safe_open", rec)
        model = precompile.load(out)

    wm = weight_map(base)
    assert not rec.read & set(LAYER0), "an eliminated tensor was read"
    assert rec.read == (set(wm) - set(LAYER0)) | {"model.embed_tokens.table"}
    only_eliminated = {f for f in set(wm.values()) if all(n in LAYER0 for n, g in wm.items() if g == f)}
    assert only_eliminated and not {os.path.realpath(snap / f) for f in only_eliminated} & set(rec.opened)
    names = {n for n, _ in model.named_parameters()}
    assert not names & set(LAYER0)
    n_params = sum(p.numel() for p in model.parameters())
    table = tiny.read_json(out / "precompile.json")["table"]["shape"]
    assert n_params == sum(p.numel() for n, p in original.named_parameters() if n not in LAYER0) \
        + table[0] * table[1]

    tok = tiny.make_tokenizer()
    for prompt in tiny.PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        want, got = logits(original, ids), logits(model, ids)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), original.generate(ids, **kw))

    # the shim in OUT_DIR, on its own, loads the same model
    spec = importlib.util.spec_from_file_location("overlay_shim", out / "precompile_loader.py")
    shim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim)
    ids = tok(tiny.PROMPTS[0], return_tensors="pt").input_ids
    assert torch.equal(logits(shim.load(out), ids), logits(model, ids))


@pytest.mark.numeric
def test_materialize_is_byte_identical_to_full_convert(base, tmp_path, hub):
    make_cache(hub, base)
    precompile.convert(REPO, tmp_path / "direct", device="cpu")
    precompile.convert(REPO, tmp_path / "ov", overlay=True, device="cpu")
    precompile.materialize(tmp_path / "ov", tmp_path / "mat")

    def tree(p: Path) -> dict[str, bytes]:
        return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}

    direct, mat = tree(tmp_path / "direct"), tree(tmp_path / "mat")
    assert sorted(direct) == sorted(mat)
    assert [n for n in direct if direct[n] != mat[n]] == []
    assert json.loads(mat["precompile.json"])["kind"] == "full"


def test_changed_local_base_is_refused(base, tmp_path):
    local = tiny.copy_tree(base, tmp_path / "base")
    out = tmp_path / "ov"
    precompile.convert(str(local), out, overlay=True, device="cpu")
    assert tiny.read_json(out / "precompile.json")["source"]["path"] == str(local.resolve())
    ids = torch.tensor([[1, 5, 9, 13]])
    before = logits(precompile.load(out), ids)

    # Same size and mtime: the cheap check trusts it (no hashing on every load); verify_base hashes and refuses.
    shard = local / weight_map(base)["model.layers.0.self_attn.q_proj.weight"]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert torch.equal(logits(precompile.load(out), ids), before)
    with pytest.raises(BaseMismatchError, match="differs from the one the overlay was computed from"):
        precompile.load(out, verify_base=True)

    # A touched file is hashed, and refused when its bytes differ.
    shard.write_bytes(bytes(data))
    with pytest.raises(BaseMismatchError, match=shard.name):
        precompile.load(out)
    r = run_cli_here("materialize", out, tmp_path / "mat", "-q")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and shard.name in r.stderr, r.stderr
    assert not (tmp_path / "mat").exists()

    # The base moved: say so, and take an explicit base instead.
    original = tiny.copy_tree(base, tmp_path / "moved")
    shutil.rmtree(local)
    with pytest.raises(PrecompileLoadError, match="is gone; pass base="):
        precompile.load(out)
    assert torch.equal(logits(precompile.load(out, base=original), ids), before)


def test_base_at_another_revision_is_refused(base, checkpoint, tmp_path, hub):
    snap = make_cache(hub, base)
    out = tmp_path / "ov"
    precompile.convert(REPO, out, overlay=True, device="cpu")
    other = make_cache(hub, checkpoint("llama", seed=1), revision=OTHER_REV)  # refs/main now points here
    with pytest.raises(BaseMismatchError, match=f"is revision {OTHER_REV}"):
        precompile.load(out, base=other)
    shutil.rmtree(snap)
    with pytest.raises(PrecompileLoadError, match=f"at revision {REV}") as e:
        precompile.load(out)
    assert not isinstance(e.value, BaseMismatchError)  # absent, not different: verify tells the two apart
    # A copy of the other revision outside the cache: its files do not match the recorded hashes.
    with pytest.raises(BaseMismatchError, match="differs"):
        precompile.load(out, base=tiny.copy_tree(other, tmp_path / "plain"))


def test_overlay_of_single_file_tied_model(checkpoint, tmp_path):
    """Gemma: one model.safetensors, tied head (the embedding stays), x scaled into the table."""
    src = checkpoint("gemma", shard_kb=None)
    out = tmp_path / "ov"
    precompile.convert(str(src), out, overlay=True, device="cpu")
    m = tiny.read_json(out / "precompile.json")
    assert m["kind"] == "overlay" and "model.embed_tokens.weight" not in m["eliminated"]
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model = precompile.load(out)
    ids = tiny.make_tokenizer()(tiny.PROMPTS[2], return_tensors="pt").input_ids
    want = logits(original, ids)
    assert torch.allclose(logits(model, ids), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    precompile.convert(str(src), tmp_path / "full", device="cpu")
    with pytest.raises(PrecompileLoadError, match="takes no base"):
        precompile.load(tmp_path / "full", base=src)


def test_verify_passes_on_overlay_and_fails_on_changed_base(checkpoint, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(checkpoint("llama"), base)
    out = tmp_path / "ov"
    precompile.convert(str(base), out, overlay=True, device="cpu")
    r = run_cli_here("verify", out, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "copied-tensors  PASS    overlay" in r.stdout
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    shard = base / index["model.layers.0.self_attn.q_proj.weight"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x40  # a different weight in a file the table was computed from
    shard.write_bytes(bytes(data))
    r = run_cli_here("verify", out, "--quiet")
    assert r.returncode == 1 and "reference" in r.stderr, r.stdout + r.stderr
