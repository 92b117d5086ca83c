"""The converted model generates as the original does: generation settings, tokenizer, pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from conftest import run_cli_here
from precompile import convert, load
from precompile.io.hashed_copy import file_sha256

MAX_NEW = 12


def greedy(model, tok, prompt: str) -> list[int]:
    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def no_gen_source(checkpoint, tmp_path_factory):
    """A float32 llama without generation_config.json whose config.json's eos is a token the original emits
    greedily a few tokens into "hello world", so generate() must stop there."""
    src = tiny.copy_tree(checkpoint("llama"), tmp_path_factory.mktemp("nogen") / "src")
    (src / "generation_config.json").unlink()
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = greedy(AutoModelForCausalLM.from_pretrained(str(src)), tok, "hello world")
    eos = next(t for i, t in enumerate(ids) if i >= 2 and t not in ids[:i])
    cfg = json.loads((src / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (src / "config.json").write_text(json.dumps(cfg))
    return src, eos


@pytest.mark.parametrize("overlay", [False, True])
def test_source_without_generation_config_generates_and_stops_like_the_original(no_gen_source, tmp_path, overlay):
    src, eos = no_gen_source
    out = tmp_path / "out"
    convert(str(src), out, overlay=overlay)
    orig = AutoModelForCausalLM.from_pretrained(str(src))
    conv = load(out)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        assert getattr(conv.generation_config, key) == getattr(orig.generation_config, key), key
    assert conv.generation_config.eos_token_id == eos
    tok = AutoTokenizer.from_pretrained(str(src))
    want = greedy(orig, tok, "hello world")
    assert want[-1] == eos and len(want) < MAX_NEW  # the original stops at its eos ...
    assert greedy(conv, tok, "hello world") == want  # ... and so does the converted model
    manifest = json.loads((out / "precompile.json").read_text())
    assert manifest["outputs"]["generation_config.json"] == file_sha256(out / "generation_config.json")
    assert not (src / "generation_config.json").exists()  # the source is untouched


def test_source_generation_config_is_carried_unchanged(checkpoint, tmp_path):
    src = checkpoint("llama")
    out = tmp_path / "out"
    convert(str(src), out)
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()


def test_dry_run_names_the_derived_generation_config(no_gen_source, tmp_path):
    src, _ = no_gen_source
    r = run_cli_here("convert", src, tmp_path / "out", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "generation_config.json (derived from config.json" in r.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("trust", [None, True])
def test_auto_tokenizer_loads_without_asking(converted_family, tmp_path, trust):
    """A fresh process without this package on the path; transformers' prompt is `input()`, which is recorded
    (a closed stdin would hide it: transformers turns the EOFError into a silent fallback)."""
    src, out = converted_family("llama")  # read-only
    code = ("import builtins, json, sys; asked = []\n"
            "builtins.input = lambda *a: asked.append(a) or 'n'\n"
            "from transformers import AutoConfig, AutoTokenizer\n"
            f"t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code={trust})\n"
            f"c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code={trust})\n"
            "print(json.dumps([asked, type(t).__name__, t('hello world')['input_ids'], c.vocab_size]))")
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(out)], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    asked, cls, ids, vocab = json.loads(r.stdout.splitlines()[-1])
    ref = AutoTokenizer.from_pretrained(str(src))
    assert asked == [] and cls == type(ref).__name__ and ids == ref("hello world")["input_ids"]
    assert vocab == tiny.VOCAB


def test_pipeline_text_generation(no_gen_source, tmp_path):
    from transformers import pipeline

    src, _ = no_gen_source
    out = tmp_path / "out"
    convert(str(src), out)
    want = pipeline("text-generation", model=str(src))("hello world", max_new_tokens=MAX_NEW, do_sample=False)
    got = pipeline("text-generation", model=str(out), trust_remote_code=True)("hello world", max_new_tokens=MAX_NEW,
                                                                              do_sample=False)
    assert got == want and got[0]["generated_text"].startswith("hello world")

