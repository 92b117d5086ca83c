"""The manifest records the profile a conversion was made with, so nothing after `convert` needs --profile."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from conftest import QWEN3_PROFILE, run_cli_here
from transformers import AutoModelForCausalLM

import precompile
from precompile.batch import run_batch

# A user's profile (test_families_parallel_blocks's hand-written Qwen3 one, with the FFN width `plan` needs), named
# so that only the recorded profile can give this name back.
PROFILE = "# my own Qwen3 profile" + QWEN3_PROFILE.replace("name: qwen3-custom", "name: my-qwen3").replace(
    "  n_layers: [num_hidden_layers]\n", "  n_layers: [num_hidden_layers]\n  intermediate_size: [intermediate_size]\n")


def _write_profile(tmp_path: Path) -> Path:
    p = tmp_path / "profiles" / "mine.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(PROFILE, encoding="utf-8")
    return p


def _manifest(out: Path) -> dict:
    return json.loads((out / "precompile.json").read_text())


def test_verify_plan_and_load_without_the_profile_file(checkpoint, tmp_path):
    src = checkpoint("qwen3")
    prof = _write_profile(tmp_path)
    out = tmp_path / "out"
    r = run_cli_here("convert", src, out, "--profile", prof, "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    rec = _manifest(out)["profile"]
    assert (rec["name"], rec["path"], rec["text"]) == ("my-qwen3", str(prof), PROFILE)
    prof.unlink()

    j = tmp_path / "report.json"
    r = run_cli_here("verify", out, "--max-new-tokens", "2", "--rows", "16", "--json", j, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(j.read_text())["profile"] == "my-qwen3"

    r = run_cli_here("plan", out, "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["profile"] == "my-qwen3"

    ids = torch.tensor([[5, 17, 42, 99, 150]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
        got = precompile.load(out)(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_materialize_uses_the_overlays_recorded_profile(checkpoint, tmp_path):
    src = checkpoint("qwen3")
    prof = _write_profile(tmp_path)
    precompile.convert(str(src), tmp_path / "direct", profile=str(prof), device="cpu")
    precompile.convert(str(src), tmp_path / "ov", profile=str(prof), overlay=True, device="cpu")
    prof.unlink()
    r = run_cli_here("materialize", tmp_path / "ov", tmp_path / "full", "--quiet")
    assert r.returncode == 0, r.stderr
    full, direct = _manifest(tmp_path / "full"), _manifest(tmp_path / "direct")
    assert full["profile"] == direct["profile"] and full["profile"]["name"] == "my-qwen3"
    assert (tmp_path / "full" / "precompile_table.safetensors").read_bytes() == \
        (tmp_path / "direct" / "precompile_table.safetensors").read_bytes()


def test_manifest_without_recorded_profile_still_verifies(checkpoint, tmp_path):
    """Conversions made before the profile was recorded: the shipped profile of the recorded name."""
    out = tmp_path / "out"
    precompile.convert(str(checkpoint("llama")), out, device="cpu")
    manifest = _manifest(out)
    shipped = Path(precompile.__file__).parent.parent / "configs" / "llama.yaml"
    assert manifest["profile"]["text"] == shipped.read_text()
    for key in ("text", "path"):
        del manifest["profile"][key]
    (out / "precompile.json").write_text(json.dumps(manifest))
    r = run_cli_here("verify", out, "--max-new-tokens", "2", "--rows", "16", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_cli_here("plan", out, "--json", "-")
    assert r.returncode == 0 and json.loads(r.stdout)["profile"] == "llama", r.stderr


def test_batch_reconverts_when_the_profile_file_changes(checkpoint, tmp_path):
    prof = _write_profile(tmp_path)
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"models": [{"source": str(checkpoint("qwen3")), "out": "q",
                                               "profile": str(prof), "device": "cpu"}]}))
    first = run_batch(zoo, tmp_path / "root")
    assert first[0].status == "ok", first[0].error
    assert first[0].plan["profile"] == "my-qwen3"  # batch's plan of the OUT_DIR reads the recorded profile
    assert run_batch(zoo, tmp_path / "root")[0].status == "skipped"
    prof.write_text(PROFILE + "# edited\n", encoding="utf-8")
    again = run_batch(zoo, tmp_path / "root")
    assert again[0].status == "ok", again[0].error
    assert _manifest(tmp_path / "root" / "q")["profile"]["text"].endswith("# edited\n")

