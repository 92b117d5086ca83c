"""`precompile verify`: passes on real conversions, fails (naming the check) on each kind of damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
from conftest import run_cli, run_cli_here, tree_snapshot
from precompile.check.row_check import ulp
from precompile.check.reference_model import reference_model
from precompile.check.verify import _row_ids, verify
from precompile.check.verify_options import read_prompts
from precompile.io.hashed_copy import file_sha256
from precompile.io.safetensors_files import Checkpoint, read_header

NEW = 3  # generated tokens: enough to exercise the KV-cache path, cheap


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(tiny.PROMPTS) + "\n", encoding="utf-8")
    return p


@pytest.fixture
def converted(converted_family):
    """converted(family, dtype) -> (source dir, OUT_DIR), converted once per session (conftest)."""
    return converted_family


def fresh_copy(src_out: tuple[Path, Path], tmp_path: Path, with_source: bool = False) -> tuple[Path, Path]:
    """A private copy of OUT_DIR (and optionally of the source, re-pointing the manifest at it)."""
    src, out = src_out
    out2 = shutil.copytree(out, tmp_path / "out")
    if with_source:
        src2 = shutil.copytree(src, tmp_path / "src")
        m = json.loads((out2 / "precompile.json").read_text())
        m["source"]["path"] = str(src2)
        (out2 / "precompile.json").write_text(json.dumps(m))
        return src2, out2
    return src, out2


def prompt_ids(out: Path) -> set[int]:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    return {i for p in tiny.PROMPTS for i in tok(p)["input_ids"]}


def perturb_row(out: Path, token: int, ulps: int = 8, rehash: bool = True, one: bool = False) -> None:
    """Move every value of one stored table row (or only its largest, with one) by `ulps` ulp, in place.

    With rehash the manifest's sha256 of the table is updated, so only the row check itself can notice.
    """
    m = json.loads((out / "precompile.json").read_text())
    path = out / m["table"]["file"]
    info = read_header(path)[0][m["table"]["tensor"]]
    with safe_open(path, framework="pt") as f:
        row = f.get_slice(m["table"]["tensor"])[token: token + 1]
    dtype = row.dtype
    step = ulps * ulp(row.double(), dtype)
    if one:
        step = torch.where(row.abs() == row.abs().max(), step, 0.0)
    new = (row.double() + step).to(dtype)
    assert not torch.equal(new, row)
    raw = new.contiguous().view(torch.uint8).numpy().tobytes()
    with open(path, "r+b") as f:
        f.seek(info.start + token * len(raw))
        f.write(raw)
    if rehash:
        m["outputs"][path.name] = file_sha256(path)
        (out / "precompile.json").write_text(json.dumps(m))


def by_name(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["checks"]}


def failed(result: dict) -> set[str]:
    return {c["name"] for c in result["checks"] if not c["passed"]}


# --------------------------------------------------------------------------------------------- passes


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama", "gemma", "qwen2", "mixtral"])
def test_passes_on_converted_models(converted, prompts_file, family, dtype):
    _, out = converted(family, dtype)
    r = verify(out, prompts=prompts_file, max_new_tokens=NEW)
    assert r["passed"], failed(r)
    c = by_name(r)
    assert set(c) == {"integrity", "reference", "copied-tensors", "layout", "table-rows", "load", "logits",
                      "generation", "fp32-reference"}
    assert c["table-rows"]["metrics"]["rows"] == tiny.VOCAB  # the default sample covers the tiny vocabulary
    assert c["logits"]["metrics"]["positions"] > 10
    if dtype == "float32":
        assert c["logits"]["metrics"]["max_abs_diff"] < 1e-4
        assert c["generation"]["metrics"]["identical"] == len(tiny.PROMPTS)
        assert c["fp32-reference"].get("skipped")
    else:  # the float32 run happened and says how close each bf16 model is
        m = c["fp32-reference"]["metrics"]
        assert m["original_rms"] > 0 and m["converted_rms"] > 0


def test_cli_passes_writes_json_and_table(converted, prompts_file, tmp_path):
    _, out = converted("llama", "bfloat16")
    before = tree_snapshot(out)
    j = tmp_path / "report.json"
    r = run_cli("verify", out, "--prompts", prompts_file, "--max-new-tokens", NEW, "--json", j, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""  # --quiet: no progress, no transformers noise
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith("PASSED: 9 passed (")  # nothing skipped in bfloat16: the float32 run happened
    assert any(line.startswith("table-rows") and "PASS" in line for line in lines)
    data = json.loads(j.read_text())
    assert data["passed"] is True
    assert {"name", "passed", "metrics", "threshold"} <= set(data["checks"][0])
    assert tree_snapshot(out) == before  # verify never writes into OUT_DIR


def test_builtin_prompts_and_jsonl(converted, tmp_path):
    _, out = converted("qwen2", "float32")
    r = verify(out, max_new_tokens=2, rows=8)
    assert r["passed"] and r["prompts"] >= 5
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "hello world"}\n\n{"prompt": "the quick", "id": 2}\n', encoding="utf-8")
    assert read_prompts(p) == ["hello world", "the quick"]


def test_reference_shares_the_converted_tensors(converted):
    """Memory: the original model reuses the converted model's tensors; only eliminated ones are new."""
    from precompile import load

    src, out = converted("llama", "float32")
    conv = load(out)
    ckpt = Checkpoint(src)
    ref = reference_model(conv, src, ckpt, torch.float32, torch.device("cpu"))
    conv_ptrs = {p.data_ptr() for p in conv.parameters()}
    manifest = json.loads((out / "precompile.json").read_text())
    own = [n for n, p in ref.named_parameters() if p.data_ptr() not in conv_ptrs]
    assert sorted(own) == sorted(manifest["eliminated"])


# --------------------------------------------------------------------------------------------- failures


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unused_row_perturbed_8_ulp(converted, prompts_file, tmp_path, dtype):
    _, out = fresh_copy(converted("llama", dtype), tmp_path)
    token = max(set(range(tiny.VOCAB)) - prompt_ids(out))
    perturb_row(out, token)
    r = verify(out, prompts=prompts_file, max_new_tokens=NEW, rows="all")
    assert failed(r) == {"table-rows"}  # the manifest was re-hashed: only the row check can see it
    assert by_name(r)["table-rows"]["metrics"]["failed_ids"] == [token]
    # a sample without that row cannot see it (prompts never use it) ...
    r0 = verify(out, prompts=prompts_file, max_new_tokens=NEW, rows=0)
    assert r0["passed"]
    # ... and the default sample catches it whenever the row is drawn
    seed = next(s for s in range(1000) if token in _row_ids(tiny.VOCAB, 20, s, set())[0])
    r1 = verify(out, prompts=prompts_file, max_new_tokens=NEW, rows=20, seed=seed)
    assert "table-rows" in failed(r1)
    assert by_name(r1)["table-rows"]["metrics"]["seed"] == seed


@pytest.mark.numeric
def test_single_value_8_ulp_in_bfloat16_table(converted, prompts_file, tmp_path):
    _, out = fresh_copy(converted("gemma", "bfloat16"), tmp_path)
    perturb_row(out, 150, one=True)
    r = verify(out, prompts=prompts_file, max_new_tokens=1, rows="all")
    assert failed(r) == {"table-rows"} and by_name(r)["table-rows"]["metrics"]["failed_ids"] == [150]


def test_used_row_perturbed_fails_default_run_via_cli(converted, prompts_file, tmp_path):
    _, out = fresh_copy(converted("llama", "bfloat16"), tmp_path)
    token = sorted(prompt_ids(out))[3]
    perturb_row(out, token)
    r = run_cli_here("verify", out, "--prompts", prompts_file, "--max-new-tokens", NEW, "--rows", "0", "--quiet")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "table-rows" in r.stdout.splitlines()[-1]
    assert "FAIL" in next(line for line in r.stdout.splitlines() if line.startswith("table-rows"))
    assert r.stderr.startswith("verification failed: FAILED: ") and "table-rows" in r.stderr


def test_wrong_column_layout_in_manifest(converted, prompts_file, tmp_path):
    _, out = fresh_copy(converted("llama", "float32"), tmp_path)
    m = json.loads((out / "precompile.json").read_text())
    cols = {c["name"]: c for c in m["table"]["columns"]}
    k, v = cols["k"], cols["v"]  # same width (GQA): the loader still loads, with k and v swapped
    (k["start"], k["stop"]), (v["start"], v["stop"]) = (v["start"], v["stop"]), (k["start"], k["stop"])
    (out / "precompile.json").write_text(json.dumps(m))
    r = verify(out, prompts=prompts_file, max_new_tokens=NEW, rows=0)
    assert {"layout", "logits"} <= failed(r)
    assert "columns" in by_name(r)["layout"]["metrics"]["mismatched"]
    assert "table-rows" not in failed(r)  # the table itself is right


def _drop_guard_tensor(out: Path, m: dict) -> tuple[str, str]:
    """Rewrite the table file and the index without the guard tensor; returns the files changed."""
    path, guard = out / m["table"]["file"], m["table"]["guard"]
    with safe_open(path, framework="pt") as f:
        table, metadata = f.get_tensor(m["table"]["tensor"]), f.metadata()
    save_file({m["table"]["tensor"]: table}, path, metadata=metadata)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    del index["weight_map"][guard]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return path.name, "model.safetensors.index.json"


def test_table_file_without_its_guard(converted, prompts_file, tmp_path):
    """The guard keeps plain transformers from loading random layer-0 weights: a table file rewritten without
    it (hashes updated, so integrity passes) fails copied-tensors, naming it."""
    _, out = fresh_copy(converted("llama", "float32"), tmp_path)
    m = json.loads((out / "precompile.json").read_text())
    guard = m["table"]["guard"]
    for name in _drop_guard_tensor(out, m):
        m["outputs"][name] = file_sha256(out / name)
    (out / "precompile.json").write_text(json.dumps(m))
    r = verify(out, prompts=prompts_file, max_new_tokens=NEW, rows=0)
    assert failed(r) == {"copied-tensors"}
    assert by_name(r)["copied-tensors"]["metrics"]["mismatched"] == [f"{guard} (the guard)"]


@pytest.mark.parametrize("what", ["guard tensor", "config message"])
def test_current_format_without_its_guards_fails(what, converted, prompts_file, tmp_path):
    """Format version 2 must hold both guards: the table file's guard tensor (here removed from the file, the
    index and the manifest, hashes re-recorded) and config.json's plain-load message."""
    _, out = fresh_copy(converted("llama", "float32"), tmp_path)
    m = json.loads((out / "precompile.json").read_text())
    assert m["format_version"] == 2
    if what == "guard tensor":
        names, want = _drop_guard_tensor(out, m), f"{m['table'].pop('guard')} (the guard)"
    else:
        cfg = json.loads((out / "config.json").read_text())
        del cfg["transformers_weights"]
        (out / "config.json").write_text(json.dumps(cfg))
        names, want = ("config.json",), "config.json transformers_weights (the plain-load guard)"
    for name in names:
        m["outputs"][name] = file_sha256(out / name)
    (out / "precompile.json").write_text(json.dumps(m))
    r = verify(out, prompts=prompts_file, max_new_tokens=NEW, rows=0)
    assert failed(r) == {"copied-tensors"}
    assert by_name(r)["copied-tensors"]["metrics"]["mismatched"] == [want]


def test_reference_layer0_weight_changed_after_conversion(converted, prompts_file, tmp_path):
    src, out = fresh_copy(converted("llama", "float32"), tmp_path, with_source=True)
    name = "model.layers.0.self_attn.k_proj.weight"
    info = Checkpoint(src).info(name)
    tensors = load_file(src / info.file)
    tensors[name] = tensors[name] * 1.001
    save_file(tensors, src / info.file, metadata={"format": "pt"})
    r = verify(out, prompts=prompts_file, max_new_tokens=NEW)
    assert not r["passed"]
    assert {"reference", "table-rows"} <= failed(r)
    assert by_name(r)["reference"]["metrics"]["changed"] == [info.file]
    assert "copied-tensors" not in failed(r)  # layer 0 is not copied: the rows check is what sees it


def test_modified_out_dir_file(converted, prompts_file, tmp_path):
    _, out = fresh_copy(converted("llama", "float32"), tmp_path)
    ck = Checkpoint(out)
    info = ck.tensors["model.layers.1.mlp.down_proj.weight"]
    with open(out / info.file, "r+b") as f:  # flip one byte of a copied tensor
        f.seek(info.start + 5)
        b = f.read(1)
        f.seek(info.start + 5)
        f.write(bytes([b[0] ^ 0x40]))
    r = run_cli_here("verify", out, "--prompts", prompts_file, "--max-new-tokens", NEW, "--rows", "0",
                "--json", tmp_path / "r.json", "--quiet")
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert {"integrity", "copied-tensors"} <= failed(res)
    c = by_name(res)
    assert c["integrity"]["metrics"]["changed"] == [info.file]
    assert c["copied-tensors"]["metrics"]["mismatched"] == ["model.layers.1.mlp.down_proj.weight"]


# --------------------------------------------------------------------------------------------- bad input


def _bad(args, tmp_path, subprocess: bool = False) -> str:
    """Exit 2, one line on stderr, nothing on stdout, no --json file. In-process unless asked (faster)."""
    j = tmp_path / "never.json"
    argv = ["verify", *map(str, args), "--json", str(j)]
    if subprocess:
        r = run_cli(*argv)
        code, out, err = r.returncode, r.stdout, r.stderr
    else:
        from click.testing import CliRunner

        from precompile.cli import main

        res = CliRunner().invoke(main, argv)
        code, out, err = res.exit_code, res.stdout, res.stderr
    assert code == 2, out + err
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not j.exists()
    return err


def test_bad_input(converted, prompts_file, tmp_path, checkpoint):
    src, out = converted("llama", "float32")
    before = tree_snapshot(out)
    assert "not a precompiled model" in _bad([src], tmp_path, subprocess=True)
    assert "not found" in _bad([out, "--prompts", tmp_path / "missing.txt"], tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert "empty" in _bad([out, "--prompts", tmp_path / "empty.txt"], tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in _bad([out, "--prompts", tmp_path / "latin1.txt"], tmp_path)
    assert "reference not found" in _bad([out, "--reference", tmp_path / "nowhere"], tmp_path, subprocess=True)
    moved = fresh_copy((src, out), tmp_path / "m", with_source=True)[1]
    shutil.rmtree(tmp_path / "m" / "src")
    assert "--reference" in _bad([moved, "--prompts", prompts_file], tmp_path)
    assert "--rows" in _bad([out, "--rows", "many"], tmp_path)
    assert tree_snapshot(out) == before


def test_hub_source_is_found_by_recorded_revision(checkpoint, tmp_path):
    """A hub conversion records id + revision; verify finds that snapshot in the HF cache, offline."""
    src = checkpoint("llama", "float32")
    hf = tmp_path / "hf"
    tiny.lay_out_hub_cache(hf, "org/tiny-llama", src)
    out = tmp_path / "out"
    r = run_cli("convert", "org/tiny-llama", out, "-q", env={"HF_HOME": str(hf)})
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "precompile.json").read_text())["source"]["revision"] == "0" * 40
    r = run_cli("verify", out, "--max-new-tokens", 2, "--rows", 8, "-q", env={"HF_HOME": str(hf)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vs org/tiny-llama" in r.stdout.splitlines()[-1]


def test_summary_counts_passed_failed_and_skipped_apart():
    """A skipped check is not counted as passed (issue 25): `PASSED: 8 passed, 1 skipped`."""
    from precompile.publish.card import verify_section
    from precompile.check.check_report import summary_line

    checks = [{"name": f"c{i}", "passed": True, "metrics": {}, "threshold": {}} for i in range(8)]
    skipped = {"name": "fp32-reference", "passed": True, "metrics": {}, "threshold": {}, "skipped": "float32"}
    result = {"out_dir": "out", "reference": "src", "seconds": 1.0, "checks": [*checks, skipped], "dtype": "float32",
              "prompts": 3}
    assert summary_line(result) == "PASSED: 8 passed, 1 skipped (out vs src, 1.0s)"
    assert "**Passed**: 8 passed, 1 skipped of the checks" in verify_section(result)
    result["checks"][0] = {**checks[0], "passed": False}
    assert summary_line(result) == "FAILED: c0 (7 passed, 1 failed, 1 skipped; out vs src, 1.0s)"


def test_precision_sentence_only_outside_the_noise():
    from precompile.check.check_report import precision_verdict
    from precompile.check.model_checks import precision_difference

    assert precision_verdict(*precision_difference([-1.0, -1.1, -0.9, -1.0])) == "precompute gained precision"
    assert precision_verdict(*precision_difference([1.0, 1.1, 0.9, 1.0])) == "precompute cost precision"
    assert precision_verdict(*precision_difference([-1.0, 1.2, -0.9, 0.8])) is None  # inside two standard errors
    assert precision_verdict(*precision_difference([-1.0, -1.0])) is None  # too few prompts to know the noise
