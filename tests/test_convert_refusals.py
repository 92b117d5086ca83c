"""Bad input is refused with one line naming the problem, exit 2, nothing half-written, inputs untouched.

Most cases run the CLI in-process (click's CliRunner: an uncaught exception shows up as
`result.exception`, so "no traceback" is checked exactly); the hub-offline case and the
interrupt tests run `python -m precompile` as a real subprocess. Corrupt inputs are copies of
the session's tiny Llama checkpoint, edited byte by byte.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import tiny
from conftest import (ROOT, check_refused, edit_json, invoke, leftovers, read_st, run_cli, shard_of, state_dict,
                      to_pickle, tree_snapshot, write_st)
from precompile.convert import convert
from precompile.errors import UserError
from precompile.loader import MANIFEST, PrecompileLoadError, load

EMB = "model.embed_tokens.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"


# ---------------------------------------------------------------- the control: the same call succeeds


def test_control_copy_converts(src, out):
    r = invoke(src, out, "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert (out / MANIFEST).is_file() and not leftovers(out.parent)


# ---------------------------------------------------------------- SOURCE and config.json


def test_source_not_found_local(tmp_path, out):
    check_refused(tmp_path / "nope", out, words=("not found",), source_arg=str(tmp_path / "no" / "such" / "dir"))


def test_source_is_a_file(tmp_path, out):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    check_refused(f, out, words=("is a file", "directory"))


def test_revision_with_local_dir(src, out):
    check_refused(src, out, "--revision", "main", words=("--revision", "local"))


def test_hub_id_offline_empty_cache(tmp_path):
    """A real subprocess: HF_HUB_OFFLINE and HF_HOME are read when huggingface_hub is imported."""
    out = tmp_path / "out"
    r = run_cli("convert", "someorg/some-model", out, "--quiet", cwd=tmp_path,
                env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "someorg/some-model" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not out.exists() and not leftovers(tmp_path)


def test_config_missing(src, out):
    (src / "config.json").unlink()
    check_refused(src, out, words=("no config.json",))


@pytest.mark.parametrize("text", ["{\"model_type\": \"llama\",", "[1, 2]", "\xff\xfe"],
                         ids=["truncated", "list", "binary"])
def test_config_malformed(src, out, text):
    (src / "config.json").write_bytes(text.encode("latin-1"))
    check_refused(src, out, words=("config.json",))


@pytest.mark.parametrize("change, words", [
    (dict(num_key_value_heads=3), ("4 attention heads", "3 key/value heads")),
    (dict(hidden_size="64"), ("hidden_size", "'64'", "positive whole number")),
    (dict(num_attention_heads=0), ("num_attention_heads = 0", "positive")),
], ids=["heads-not-multiple", "size-is-string", "zero-heads"])
def test_config_sizes_invalid(src, out, change, words):
    edit_json(src / "config.json", lambda c: c.update(change))
    check_refused(src, out, words=words)


def test_refusal_is_the_last_line_without_quiet(src, out):
    """With progress output on, a refusal found after planning is still one `error:` line, printed last."""
    _poison(src, EMB, 5 * 64, math.nan)
    r = invoke(src, out, "--device", "cpu")
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
    lines = r.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]] and "token id 5" in lines[-1]
    assert "Traceback" not in r.stderr and not out.exists() and not leftovers(out.parent)


def test_config_lacks_size(src, out):
    edit_json(src / "config.json", lambda c: c.pop("hidden_size"))
    check_refused(src, out, words=("hidden_size",))


def test_family_without_profile(src, out):
    edit_json(src / "config.json",
              lambda c: c.update(model_type="recurrent_gemma", architectures=["RecurrentGemmaForCausalLM"]))
    check_refused(src, out, words=("no profile", "RecurrentGemmaForCausalLM", "--profile"))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_absolute_position_embeddings(tmp_path, out, family):
    kw = dict(gpt2=dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32),
              opt=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, vocab_size=64,
                       max_position_embeddings=32, word_embed_proj_dim=32))[family]
    from transformers import AutoConfig, AutoModelForCausalLM

    src = tmp_path / family
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).save_pretrained(src)
    check_refused(src, out, words=(family, "absolute position embeddings", "rope"))


def test_quantized_checkpoint(src, out):
    edit_json(src / "config.json", lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    check_refused(src, out, words=("quantization_config", "gptq"))


def test_remote_code_architecture(src, out):
    edit_json(src / "config.json", lambda c: c.update(
        model_type="my_custom_lm", architectures=["MyCustomForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_custom.MyCustomForCausalLM"}))
    (src / "modeling_custom.py").write_text("raise SystemExit('checkpoint code ran')\n")
    check_refused(src, out, words=("my_custom_lm", "MyCustomForCausalLM", "trust_remote_code"))


def test_remote_code_with_native_model_type(src, out):
    """A native model_type whose auto_map points at code in the checkpoint is still checkpoint code."""
    edit_json(src / "config.json", lambda c: c.update(
        architectures=["MyLlamaForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling.MyLlamaForCausalLM"}))
    check_refused(src, out, words=("MyLlamaForCausalLM", "trust_remote_code"))


def test_precompiled_output_as_source(converted, tmp_path):
    check_refused(converted, tmp_path / "again", words=("already a precompiled",))


def test_tokenizer_ids_beyond_embedding(src, out):
    edit_json(src / "tokenizer.json", lambda t: t["added_tokens"].append(
        {"id": 500, "content": "<extra>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}))
    check_refused(src, out, words=("tokenizer.json", "<extra>", "500", f"{tiny.VOCAB} rows"))


def test_tokenizer_vocab_beyond_embedding(src, out):
    edit_json(src / "tokenizer.json", lambda t: t["model"]["vocab"].update({"zzz": tiny.VOCAB}))
    check_refused(src, out, words=("tokenizer.json", "'zzz'", str(tiny.VOCAB)))


# ---------------------------------------------------------------- safetensors files


def test_truncated_shard(src, out):
    f = shard_of(src, K)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    check_refused(src, out, words=(f.name, "truncated"))


def test_shard_cut_inside_header(src, out):
    f = shard_of(src, K)
    f.write_bytes(f.read_bytes()[:40])
    check_refused(src, out, words=(f.name, "header"))


def test_garbage_header(src, out):
    f = shard_of(src, Q)
    header, body = read_st(f)
    raw = b"{this is not json!!}" + b" " * 4
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    check_refused(src, out, words=(f.name, "not valid JSON"))


def test_random_bytes_instead_of_safetensors(src, out):
    f = shard_of(src, Q)
    f.write_bytes(os.urandom(f.stat().st_size))
    check_refused(src, out, words=(f.name,))


def test_header_offsets_past_end(src, out):
    f = shard_of(src, Q)
    header, body = read_st(f)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096
    write_st(f, header, body)
    check_refused(src, out, words=(f.name, last, "past the end"))


def test_header_overlapping_tensors(src, out):
    f = shard_of(src, EMB)
    header, body = read_st(f)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    if len(names) < 2:  # give the shard a second tensor that overlaps the first
        header["extra"] = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    else:
        b, e = header[names[1]]["data_offsets"]
        header[names[1]]["data_offsets"] = [b - 4, e - 4]
    write_st(f, header, body)
    check_refused(src, out, words=(f.name, "overlaps"))


def test_trailing_bytes_after_tensors(src, out):
    f = shard_of(src, Q)
    f.write_bytes(f.read_bytes() + b"\0" * 64)
    check_refused(src, out, words=(f.name, "after the last tensor"))


def test_unsupported_dtype_in_header(src, out):
    f = shard_of(src, Q)
    header, body = read_st(f)
    header[Q]["dtype"] = "F4_E2M1"
    write_st(f, header, body)
    check_refused(src, out, words=(f.name, Q, "dtype"))


def test_wrong_dtype(src, out):
    """Same bytes, declared I32: a layer-0 weight that is not float."""
    f = shard_of(src, Q)
    header, body = read_st(f)
    header[Q]["dtype"] = "I32"
    write_st(f, header, body)
    check_refused(src, out, words=(f.name, Q, "I32"))


def test_shape_disagrees_with_config(src, out):
    edit_json(src / "config.json", lambda c: c.update(num_key_value_heads=4))
    check_refused(src, out, words=(K, "shape", "[32, 64]", "[64, 64]"))


def test_vocab_disagrees_with_config(src, out):
    edit_json(src / "config.json", lambda c: c.update(vocab_size=tiny.VOCAB + 1))
    check_refused(src, out, words=(EMB, "shape", str(tiny.VOCAB + 1)))


def _drop_tensor(src: Path, name: str, keep_in_index: bool) -> Path:
    from safetensors.torch import load_file, save_file

    f = shard_of(src, name)
    sd = load_file(f)
    sd.pop(name)
    save_file(sd, f, metadata={"format": "pt"})
    if not keep_in_index:
        edit_json(src / "model.safetensors.index.json", lambda i: i["weight_map"].pop(name))
    return f


def test_missing_tensor(src, out):
    _drop_tensor(src, Q, keep_in_index=False)
    check_refused(src, out, words=(Q, "missing"))


def test_index_names_tensor_its_shard_lacks(src, out):
    f = _drop_tensor(src, Q, keep_in_index=True)
    check_refused(src, out, words=(Q, f.name, "does not hold"))


def test_index_names_missing_shard(src, out):
    f = shard_of(src, K)
    f.unlink()
    check_refused(src, out, words=(f.name, "missing"))


def test_index_malformed(src, out):
    (src / "model.safetensors.index.json").write_text('{"metadata": {}}')
    check_refused(src, out, words=("model.safetensors.index.json", "weight_map"))


def _poison(src: Path, name: str, flat_index: int, value: float) -> None:
    f = shard_of(src, name)
    header, body = read_st(f)
    b, _ = header[name]["data_offsets"]
    body = bytearray(body)
    body[b + 4 * flat_index: b + 4 * flat_index + 4] = struct.pack("<f", value)
    write_st(f, header, bytes(body))


def test_nan_in_embedding_names_token(src, out):
    _poison(src, EMB, 17 * 64 + 5, math.nan)
    check_refused(src, out, words=("token id 17", "NaN"))


def test_failed_run_removes_the_parents_it_created(src, tmp_path):
    _poison(src, EMB, 9 * 64, math.nan)
    check_refused(src, tmp_path / "new" / "deeper" / "out", words=("token id 9",))
    assert not (tmp_path / "new").exists()


def test_inf_in_layer0_weight_names_first_token(src, out):
    _poison(src, Q, 3, math.inf)
    check_refused(src, out, "--chunk-size", "50", words=("token id 0", "not finite"))


# ---------------------------------------------------------------- pickle checkpoints


def test_pickle_only_refused_without_flag(src, out):
    to_pickle(src)
    check_refused(src, out, words=("pickle", "--allow-pickle"))


def test_pickle_only_converts_with_flag(src, out, converted):
    """--allow-pickle gives the same table as the safetensors checkpoint, and leaves no scratch copy."""
    from safetensors.torch import load_file

    to_pickle(src)
    before = tree_snapshot(src)
    r = invoke(src, out, "--quiet", "--device", "cpu", "--allow-pickle")
    assert r.exit_code == 0, r.stderr
    assert tree_snapshot(src) == before and not leftovers(out.parent)
    table = "precompile_table.safetensors"
    assert torch.equal(load_file(out / table)["model.embed_tokens.table"],
                       load_file(converted / table)["model.embed_tokens.table"])
    manifest = json.loads((out / MANIFEST).read_text())
    assert "pytorch_model.bin" in manifest["source"]["files"]
    assert not list(out.glob("*.bin"))


def test_pickle_with_code_is_refused_and_not_run(src, out, tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    sd = state_dict(src)
    sd["payload"] = Payload()
    to_pickle(src)
    torch.save(sd, src / "pytorch_model.bin")
    check_refused(src, out, "--allow-pickle", words=("pytorch_model.bin", "refused to unpickle"))
    assert not marker.exists()


def test_pickle_failure_removes_scratch_and_new_parents(src, tmp_path):
    to_pickle(src)
    _poison_pickle = torch.load(src / "pytorch_model.bin", weights_only=True)
    _poison_pickle[EMB][4, 0] = math.nan
    torch.save(_poison_pickle, src / "pytorch_model.bin")
    check_refused(src, tmp_path / "new" / "out", "--allow-pickle", words=("token id 4",))
    assert not (tmp_path / "new").exists()


def test_pickle_garbage(src, out):
    to_pickle(src)
    (src / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 10)
    check_refused(src, out, "--allow-pickle", words=("pytorch_model.bin", "cannot be read"))


# ---------------------------------------------------------------- profiles


def _profile(tmp_path: Path, fn=None, text: str | None = None) -> Path:
    p = tmp_path / "custom.yaml"
    if text is None:
        data = yaml.safe_load((ROOT / "configs" / "llama.yaml").read_text())
        fn(data)
        text = yaml.safe_dump(data)
    p.write_text(text)
    return p


def test_profile_malformed_yaml(src, out, tmp_path):
    p = _profile(tmp_path, text="name: llama\nmatch: [unclosed\n")
    check_refused(src, out, "--profile", str(p), words=(str(p), "not valid YAML", "line"))


def test_profile_missing_key(src, out, tmp_path):
    p = _profile(tmp_path, lambda d: d.pop("attention_module"))
    check_refused(src, out, "--profile", str(p), words=(str(p), "'attention_module'", "missing"))


def test_profile_missing_nested_key(src, out, tmp_path):
    p = _profile(tmp_path, lambda d: d["attn_norm"].pop("eps"))
    check_refused(src, out, "--profile", str(p), words=(str(p), "'attn_norm.eps'", "missing"))


def test_profile_unknown_activation(src, out, tmp_path):
    p = _profile(tmp_path, lambda d: d["ffn"].update(activation="swishy"))
    check_refused(src, out, "--profile", str(p), words=(str(p), "'ffn.activation'", "swishy"))


def test_config_unknown_activation(src, out):
    edit_json(src / "config.json", lambda c: c.update(hidden_act="swishy"))
    check_refused(src, out, words=("swishy", "activation"))


def test_profile_not_found(src, out, tmp_path):
    check_refused(src, out, "--profile", str(tmp_path / "none.yaml"), words=("none.yaml", "not found"))


# ---------------------------------------------------------------- OUT_DIR


def test_out_dir_not_empty_without_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    check_refused(src, out, words=("not empty", "--force"))


def test_out_dir_is_a_file(src, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    check_refused(src, out, words=("is a file",))


def test_out_dir_under_a_file(src, tmp_path):
    """Not writable, and root cannot override it: the parent is a regular file."""
    (tmp_path / "file").write_text("x")
    check_refused(src, tmp_path / "file" / "sub" / "out", words=("is a file", "writable"))
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_out_dir_in_proc_not_writable(src):
    """/proc refuses new directories even to root."""
    check_refused(src, Path("/proc/self/precompile-out"), words=("/proc/self",))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; "
                                              "test_out_dir_under_a_file and test_out_dir_in_proc cover it")
def test_out_dir_parent_read_only(src, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        check_refused(src, ro / "out", words=("not writable",))
    finally:
        ro.chmod(0o755)


def test_out_of_disk_space(src, out, monkeypatch):
    """Simulated: the filesystem reports 1 MiB free; the check runs before any work, with the numbers."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    line = check_refused(src, out, words=("disk space", "1,048,576 bytes", "needs"))
    need = int(line.split("needs ")[1].split(" bytes")[0].replace(",", ""))
    assert need > sum(f.stat().st_size for f in src.glob("*.safetensors")) // 2


def test_source_and_out_dir_same(src):
    check_refused(src, src, "--force", words=("source",))


def test_out_dir_inside_source(src):
    check_refused(src, src / "converted", words=("source", "inside"))


def test_out_dir_contains_source_with_force(base, tmp_path):
    outer = tmp_path / "outer"
    src = tiny.copy_tree(base, outer / "model")
    check_refused(src, outer, "--force", words=("contains the source",))


def test_cuda_requested_without_cuda(src, out):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    check_refused(src, out, "--device", "cuda", words=("--device cuda",))


def test_force_keeps_previous_output_on_bad_input(src, converted, tmp_path):
    """A refused run with --force leaves the previous good OUT_DIR byte-identical."""
    out = tiny.copy_tree(converted, tmp_path / "prev")
    _poison(src, EMB, 3 * 64, math.nan)
    check_refused(src, out, "--force", words=("token id 3",))


# ---------------------------------------------------------------- the loader refuses a damaged OUT_DIR


@pytest.mark.parametrize("damage, words", [
    (lambda m: m.update(format_version=99), ("format version 99",)),
    (lambda m: m.pop("table"), ("'table'",)),
    (lambda m: m["table"].update(dtype="bfloat16"), ("dtype",)),
    (lambda m: m["table"].update(shape=[m["table"]["shape"][0] + 1, m["table"]["shape"][1]]), ("shape",)),
    (lambda m: [c.update(stop=c["stop"] - 8) if c["name"] == "q" else c.update(start=c["start"] - 8)
                for c in m["table"]["columns"] if c["name"] in ("q", "k")], ("column q", "56 wide")),
    (lambda m: m["table"]["columns"][1].update(start=70), ("not contiguous",)),
    (lambda m: m["table"].pop("columns"), ("malformed", "columns")),
], ids=["version", "no-table", "dtype", "shape", "q-width", "gap", "no-columns"])
def test_loader_refuses_damaged_output(converted, tmp_path, damage, words):
    out = tiny.copy_tree(converted, tmp_path / "damaged")
    edit_json(out / MANIFEST, damage)
    with pytest.raises(PrecompileLoadError) as e:
        load(out)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_loader_refuses_truncated_table(converted, tmp_path):
    out = tiny.copy_tree(converted, tmp_path / "damaged")
    t = out / "precompile_table.safetensors"
    t.write_bytes(t.read_bytes()[:1000])
    with pytest.raises(PrecompileLoadError, match="precompile_table.safetensors"):
        load(out)


def test_library_raises_user_error(src, out):
    """The library API raises UserError (the CLI maps it to exit 2)."""
    edit_json(src / "config.json", lambda c: c.update(quantization_config={"quant_method": "awq"}))
    with pytest.raises(UserError, match="awq"):
        convert(str(src), out, device="cpu")
    assert not out.exists()


# ---------------------------------------------------------------- interrupts (real subprocesses)


@pytest.mark.parametrize("sig, previous", [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
                         ids=["sigint", "sigint-force", "sigterm-force"])
def test_interrupt_leaves_nothing_half_written(slow_source, tmp_path, sig, previous):
    out = tmp_path / "out"
    if previous:
        convert(str(slow_source), out, device="cpu")
    before = tree_snapshot(out) if previous else None
    src_before = tree_snapshot(slow_source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "precompile", "convert", str(slow_source), str(out), "--device", "cpu",
           "--chunk-size", "1", "--quiet"] + (["--force"] if previous else [])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        table = None
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = leftovers(tmp_path)
            table = next((Path(t) / "precompile_table.safetensors" for t in tmps
                          if (Path(t) / "precompile_table.safetensors").exists()), None)
            if table is not None and table.stat().st_size > 0:
                break
            time.sleep(0.05)
        assert proc.poll() is None and table is not None, f"conversion ended before it could be interrupted: " \
                                                          f"{proc.communicate()}"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err, err
    assert not leftovers(tmp_path), leftovers(tmp_path)
    if previous:
        assert tree_snapshot(out) == before
    else:
        assert not out.exists()
    assert tree_snapshot(slow_source) == src_before


def test_signal_turned_into_another_error_still_reads_as_interrupt(tmp_path):
    """safetensors can turn a KeyboardInterrupt raised in its callback into a ValueError (seen in
    test_interrupt_leaves_nothing_half_written before the fix): OutDir.write must still report the interrupt."""
    from precompile.io.out_dir import OutDir

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with OutDir.resolve(out).write():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
    assert not out.exists() and not leftovers(tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
