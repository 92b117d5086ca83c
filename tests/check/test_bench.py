"""`precompile bench`: the toggled model is the real precompiled model, and the accounting is the paper's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli_here
from precompile.check.bench import Toggle, bench, per_token_reads
from precompile.loader import read_manifest
from safetensors.torch import load_file


@pytest.fixture
def converted(converted_family):
    """(source, OUT_DIR) of the tiny Llama, converted once per session (conftest)."""
    return converted_family("llama")


def test_toggle_switches_between_the_original_and_the_lookups(converted):
    src, out = converted
    manifest = read_manifest(out)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    table = load_file(out / manifest["table"]["file"])[manifest["table"]["tensor"]]
    toggle = Toggle(model, manifest, table)
    ids = torch.tensor([[5, 17, 99, 3, 150]])
    with torch.inference_mode():
        want = model(ids).logits
        toggle.use(True)
        assert type(model.model.embed_tokens).__name__ == "TableEmbedding"
        assert model.model.embed_tokens.table.data_ptr() == table.data_ptr()  # no copy of the table
        got = model(ids).logits
        toggle.use(False)
        again = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(again, want)


def test_per_token_reads_follow_the_paper(converted):
    src, out = converted
    manifest = read_manifest(out)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    c = model.config
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    e = c.num_key_value_heads * hd
    total = sum(p.numel() for p in model.parameters())
    original = total - c.vocab_size * d + d  # untied: the input embedding is read one row per token
    eliminated = d * d + 2 * d * e + d  # q, k, v and the input norm
    assert per_token_reads(model, manifest) == (original, original - eliminated - d + (2 * d + 2 * e))


def test_bench_reports_every_metric(converted, tmp_path):
    src, out = converted
    r = bench(out, str(src), device="cpu", batches=(1, 2), prompt_len=4, decode_tokens=2, reps=1, max_reps=1)
    names = [row[0] for row in r.rows]
    assert names == ["prefill b1 (4 tokens)", "prefill b2 (4 tokens)", "decode b1", "layer 0 decode b1",
                     "decode b2", "layer 0 decode b2", "weights in memory"]
    assert all(a > 0 and b > 0 for _, _, a, b in r.rows)
    assert 0 < r.theoretical < 1
    assert "realized / theoretical" in r.table()
    assert set(r.intervals) == set(r.theory) == {row[0] for row in r.rows if row[1] != "bytes"}
    assert r.verdict is not None and r.summary()[0].startswith("verdict: ")


def test_bench_cli(converted):
    src, out = converted
    res = run_cli_here("bench", out, "--source", src, "--device", "cpu", "--batches", "1", "--prompt-len", "4",
                  "--decode-tokens", "2", "--reps", "1", "--max-reps", "1", "-q")
    assert res.returncode == 0, res.stderr
    assert "| decode b1 |" in res.stdout and "theoretical saving" in res.stdout
    assert res.stdout.startswith("verdict: ") and "\nmeasured: decode at batch 1 " in res.stdout
    bad = run_cli_here("bench", out, "--batches", "1,x")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--batches" in bad.stderr


def test_layer0_reads(converted):
    src, out = converted
    manifest = read_manifest(out)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    c = model.config
    d, e = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer0 = sum(p.numel() for p in model.model.layers[0].parameters())
    eliminated = d * d + 2 * d * e + d
    assert per_token_reads(model, manifest, layer0_only=True) == (layer0 + d, layer0 - eliminated + 2 * d + 2 * e)


def test_an_effect_below_the_noise_is_reported_as_unresolved(converted):
    """A stubbed clock whose call times are noise, the same for both variants: the saving's interval is far wider
    than the theoretical saving, so no row gives a ratio and the summary says the run cannot resolve it."""
    import random

    src, out = converted
    rng = random.Random(0)
    now = [0.0]

    def clock() -> float:
        now[0] += rng.uniform(0.5, 1.5)
        return now[0]

    r = bench(out, str(src), device="cpu", batches=(1,), prompt_len=4, decode_tokens=2, reps=3, max_reps=4,
              budget=1e9, clock=clock)
    assert r.reps == 4  # never resolved: it ran to --max-reps
    decode = next(line for line in r.table().splitlines() if line.startswith("| decode b1 |"))
    assert "unresolved" in decode and " = " not in decode
    assert r.realized("decode b1") is None
    assert "below what this run can resolve" in r.summary()[-1]


def test_saving_interval_and_its_description():
    from precompile.check.bench import describe_saving, saving_interval

    iv = saving_interval([0.10, 0.11, 0.09, 0.10])
    assert iv.low < 0.10 < iv.high and iv.n == 4
    text, ratio = describe_saving(iv, 0.2)  # resolved: 0.10 of 0.20
    assert ratio == pytest.approx(0.5) and "= 0.50" in text
    text, ratio = describe_saving(iv, 0.004)  # a 0.4% effect under a 3% wide interval
    assert ratio is None and text.startswith("unresolved")
    assert saving_interval([0.1]).width == float("inf")
