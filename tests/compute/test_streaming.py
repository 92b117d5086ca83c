"""The mechanisms that bound conversion memory: a streamed table, shared shards, a blocked FFN.

Not timed (speed and memory are measured by benchmarks/bench_convert.py); these tests show that the
mechanisms are in place and that streaming changes no byte of the output.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import os
import sys
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from conftest import sha256_of

from precompile.compute.table_math import (
    Scratch, activation, apply_norm, compute_rows, ffn_output, folded_ffn, projection_groups, stack_projections)
from precompile.convert import FFN_BLOCK, _layer0_weights, _table_chunks, convert, describe_shards
from precompile.errors import UserError
from precompile.io.progress import Progress
from precompile.io.safetensors_files import read_header
from precompile.io.shard_writer import write_table
from precompile.plan.conversion_plan import plan_conversion
from precompile.plan.table_layout import TABLE_FILE, table_file_header
from precompile.profiles.sections import ACTIVATIONS

import tiny

GPT_NEOX_PROFILE = (Path(__file__).resolve().parents[2] / "configs" / "gpt_neox.yaml").read_text()


def _in_memory_table(plan, chunk_size: int) -> torch.Tensor:
    """The non-streaming path: every tensor loaded whole with safetensors, the table built in memory."""
    root = plan.source.root
    tensors: dict[str, torch.Tensor] = {}
    for f in plan.checkpoint.files:
        tensors.update(load_file(root / f))
    spec, layout = plan.spec, plan.layout
    w = {n: t.to(plan.compute_dtype) for n, t in tensors.items() if n != spec.embedding_tensor}
    emb = tensors[spec.embedding_tensor]
    return torch.cat([compute_rows(spec, layout, emb[s:s + chunk_size], w, plan.model_dtype, plan.compute_dtype)
                      .to(plan.model_dtype) for s in range(0, emb.shape[0], chunk_size)])


def _data_bytes(path: Path, name: str) -> bytes:
    info = read_header(path)[0][name]
    with open(path, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def _header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def test_writer_holds_a_bounded_number_of_chunks(tmp_path):
    """write_table consumes chunks lazily: while chunk k is made, at most `pending + 1` older ones live."""
    alive: list[weakref.ref] = []
    most = 0
    width, n, rows = 8, 40, 5

    def chunks():
        nonlocal most
        for i in range(n):
            gc.collect()
            most = max(most, sum(r() is not None for r in alive))
            t = torch.full((rows, width), float(i), dtype=torch.bfloat16)
            alive.append(weakref.ref(t))
            yield t

    write_table(tmp_path / "t.safetensors", "table", (n * rows, width), torch.bfloat16, chunks(), pending=2)
    assert most <= 3, f"{most} earlier chunks were alive while a new one was made"
    table = load_file(tmp_path / "t.safetensors")["table"]
    assert torch.equal(table, torch.arange(n, dtype=torch.bfloat16).repeat_interleave(rows)[:, None]
                       .expand(-1, width))


def test_writer_reports_a_short_stream_and_writer_errors(tmp_path):
    with pytest.raises(RuntimeError, match="wrote 4 rows, expected 6"):
        write_table(tmp_path / "a", "t", (6, 2), torch.float32, iter([torch.zeros(4, 2)]))
    with pytest.raises(RuntimeError, match="expected \\[\\*, 2\\]"):
        write_table(tmp_path / "b", "t", (6, 2), torch.float32, iter([torch.zeros(6, 3)]))


def test_table_chunks_are_lazy(checkpoint):
    """Rows are read and computed one chunk at a time, in vocabulary order."""
    plan = plan_conversion(str(checkpoint("llama")), dtype="float32")
    gen = _table_chunks(plan, torch.device("cpu"), 16, Progress(quiet=True))
    first = next(gen)
    assert first.shape == (16, plan.layout.width)
    sizes = [first.shape[0]] + [c.shape[0] for c in gen]
    assert sizes == [16] * (plan.layout.vocab_size // 16) + [plan.layout.vocab_size % 16]


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_output_is_byte_identical_to_the_in_memory_path(checkpoint, tmp_path, dtype):
    """Shards written beside the table computation, the table streamed: no byte differs."""
    src = checkpoint("llama", dtype)
    out = tmp_path / "out"
    res = convert(str(src), out, chunk_size=16, link="auto")
    plan = res.plan
    ref = _in_memory_table(plan, 16)
    _, metadata = table_file_header(plan.layout, dtype, ref.itemsize)
    save_file({plan.layout.tensor_name: ref, plan.layout.guard: torch.zeros(1, dtype=ref.dtype)},
              tmp_path / "ref.safetensors", metadata=metadata)
    name = plan.layout.tensor_name
    assert _data_bytes(out / TABLE_FILE, name) == _data_bytes(tmp_path / "ref.safetensors", name)
    # the same header (safetensors orders metadata keys as its hash map does) and the same data
    assert _header_and_data(out / TABLE_FILE) == _header_and_data(tmp_path / "ref.safetensors")
    rewritten = [s for s in plan.shards if s.action == "rewrite"]
    assert rewritten, "the fixture must have a shard holding eliminated tensors"
    for s in rewritten:
        want = load_file(src / s.source_file)
        with safe_open(out / s.out_file, framework="pt") as f:
            assert set(f.keys()) == set(want) - set(s.eliminated)
            for k in f.keys():
                assert torch.equal(f.get_tensor(k), want[k]), k


def test_dtype_conversion_is_streamed_and_exact(checkpoint, tmp_path):
    """--dtype rewrites every shard, converting tensors in blocks; values equal a whole-tensor cast."""
    src = checkpoint("llama", "float32")
    res = convert(str(src), tmp_path / "out", chunk_size=64, dtype="bfloat16")
    for s in res.plan.shards:
        if s.out_file is None:
            continue
        assert s.action == "rewrite"
        want = load_file(src / s.source_file)
        got = load_file(tmp_path / "out" / s.out_file)
        for k, t in got.items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, want[k].to(torch.bfloat16)), k


def test_untouched_shards_are_shared_not_rewritten(checkpoint, tmp_path):
    src = checkpoint("llama")
    res = convert(str(src), tmp_path / "auto", chunk_size=64, link="auto")
    shared = [s for s in res.plan.shards if s.action == "share"]
    assert shared, "the fixture must have shards without eliminated tensors"
    for s in shared:
        method = res.methods[s.out_file]
        assert method in ("reflink", "copy")
        a, b = src / s.source_file, tmp_path / "auto" / s.out_file
        assert a.read_bytes() == b.read_bytes()
        assert os.stat(a).st_ino != os.stat(b).st_ino  # a clone or copy: editing OUT_DIR leaves the source
    assert set(res.methods) == {s.out_file for s in shared}  # rewritten shards are never "shared"

    res = convert(str(src), tmp_path / "hard", chunk_size=64, link="hardlink")
    rewritten = [s for s in res.plan.shards if s.action == "rewrite"]
    mib = sum(s.out_bytes for s in shared) / 2**20  # the log line benchmarks/bench_convert.py reads
    assert describe_shards(res.plan, res.methods) == (f"shards: {len(rewritten)} rewritten "
                                                      f"({sum(s.out_bytes for s in rewritten) / 2**20:.1f} MiB), "
                                                      f"{len(shared)} hard-linked ({mib:.1f} MiB)")
    for s in shared:
        assert res.methods[s.out_file] == "hardlink"
        assert os.stat(src / s.source_file).st_ino == os.stat(tmp_path / "hard" / s.out_file).st_ino
    for s in res.plan.shards:
        if s.action == "rewrite":
            assert os.stat(src / s.source_file).st_ino != os.stat(tmp_path / "hard" / s.out_file).st_ino


@pytest.mark.parametrize("layout,link,dtype", [("dir", "auto", "auto"), ("dir", "hardlink", "auto"),
                                               ("dir", "copy", "bfloat16"), ("hub", "copy", "auto"),
                                               ("hub", "auto", "bfloat16")])
def test_manifest_hashes_are_the_files_hashes(checkpoint, tmp_path, monkeypatch, layout, link, dtype):
    """Hashed while copying, in the same read as the source, or from a blob's name: always the file's sha256."""
    src = checkpoint("llama")
    source = str(src)
    if layout == "hub":
        import huggingface_hub.constants as c

        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
        src = tiny.lay_out_hub_cache(tmp_path / "hf", "org/tiny", src)
        source = "org/tiny"
    res = convert(source, tmp_path / "out", chunk_size=64, link=link, dtype=dtype)
    m = json.loads((tmp_path / "out" / "precompile.json").read_text())
    assert {s.action for s in res.plan.shards} >= ({"rewrite"} if dtype != "auto" else {"share", "rewrite"})
    assert m["source"]["files"] == {n: sha256_of(src / n) for n in m["source"]["files"]}
    assert set(m["source"]["files"]) >= {s.source_file for s in res.plan.shards}
    out = tmp_path / "out"
    assert m["outputs"] == {p.name: sha256_of(p) for p in out.iterdir() if p.name != "precompile.json"}


@settings(max_examples=60, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=12),
       whole=st.booleans(), block=st.sampled_from([1, 7, 64, 4096]))
def test_copy_hashed_writes_the_ranges_and_hashes_both_sides(tmp_path_factory, data, cuts, whole, block):
    """Any sorted, disjoint ranges (empty ones too), any block size: the output is their bytes in order,
    its digest theirs, and the source digest (when asked) the whole file's."""
    import precompile.io.hashed_copy as files

    d = tmp_path_factory.mktemp("copy")
    (d / "src").write_bytes(data)
    points = sorted(min(c, len(data)) for c in cuts)
    ranges = [(points[i], points[i + 1]) for i in range(0, len(points) - 1, 2)]
    out_h, src_h = hashlib.sha256(), (hashlib.sha256() if whole else None)
    old = files.BLOCK
    files.BLOCK = block
    try:
        with open(d / "src", "rb") as fin, open(d / "dst", "wb") as fout:
            files.copy_hashed(fin, fout, ranges, out_h, src_h)
    finally:
        files.BLOCK = old
    want = b"".join(data[a:b] for a, b in ranges)
    assert (d / "dst").read_bytes() == want
    assert out_h.hexdigest() == hashlib.sha256(want).hexdigest()
    if whole:
        assert src_h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_reflink_only_fails_cleanly_where_unsupported(checkpoint, tmp_path):
    src = checkpoint("llama")
    try:
        res = convert(str(src), tmp_path / "out", chunk_size=64, link="reflink")
    except UserError as e:
        assert "reflink" in str(e) and "--link" in str(e)
        assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    else:
        assert set(res.methods.values()) == {"reflink"}


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """A tiny GPT-NeoX (parallel block) checkpoint and a profile for it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tmp_path_factory.mktemp("neox")
    cfg = AutoConfig.for_model("gpt_neox", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                               num_hidden_layers=2, vocab_size=tiny.VOCAB, use_parallel_residual=True,
                               tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    tiny.randomize(model, 0)
    tiny.save_checkpoint(model, d / "model", torch.float32, shard_kb=60)
    (d / "gpt_neox.yaml").write_text(GPT_NEOX_PROFILE)
    return d / "model", d / "gpt_neox.yaml"


@pytest.mark.numeric
def test_blocked_ffn_matches_the_whole_ffn(neox):
    """A parallel block's FFN cast and applied in blocks gives the unblocked result (to rounding)."""
    src, prof = neox
    plan = plan_conversion(str(src), profile=str(prof))
    w = {k: v for f in plan.checkpoint.files for k, v in load_file(src / f).items()}
    x = torch.randn(7, 64)
    h = torch.randn(7, 64)
    whole = folded_ffn(plan.spec, x, h, w)
    for block in (1, 32, 50, 96, 1000):
        assert torch.allclose(folded_ffn(plan.spec, x, h, w, block), whole, atol=1e-5, rtol=1e-5), block
    # stored bfloat16 weights are cast per block: the same as casting them first
    wb = {k: v.to(torch.bfloat16) if "mlp" in k else v for k, v in w.items()}
    wf = {k: v.to(torch.float32) for k, v in wb.items()}
    assert torch.equal(folded_ffn(plan.spec, x, h, wb), folded_ffn(plan.spec, x, h, wf))


@pytest.mark.numeric
@pytest.mark.parametrize("family", ["gpt_neox", "gptj", "falcon_new", "cohere"])  # MLP (gelu) and GLU (silu) FFNs
def test_blocked_ffn_of_each_parallel_family(checkpoint, family):
    """Blocks that do not divide the FFN, over bfloat16 weights, give what the plain FFN formula
    (`ffn_output`: out-of-place, float32 weights) gives; the in-place activation touches only the
    FFN's own buffers, never x or h."""
    src = checkpoint(family)
    plan = plan_conversion(str(src))
    w = {k: v for f in plan.checkpoint.files for k, v in load_file(src / f).items()}
    ffn = {n for ref in plan.spec.ffn.refs() for n in ref if n}
    wb = {k: v.to(torch.bfloat16).float() for k, v in w.items()}  # values a bfloat16 checkpoint holds
    stored = {k: v.to(torch.bfloat16) if k in ffn else v for k, v in wb.items()}
    x, h = torch.randn(9, 64), torch.randn(9, 64)
    x0, h0 = x.clone(), h.clone()
    ffn_norm = plan.spec.ffn.norm
    whole = x + ffn_output(plan.spec.ffn, h if ffn_norm is None else apply_norm(ffn_norm, x, wb), wb)
    for block in (None, 7, 50):
        got = folded_ffn(plan.spec, x, h, stored, block)
        assert torch.allclose(got, whole, atol=1e-5, rtol=1e-5), block
    assert torch.equal(x, x0) and torch.equal(h, h0)


def test_blocked_ffn_reuses_its_buffers(neox, monkeypatch):
    """Each role's buffer is made once, however many blocks the FFN is cut into (a new 64 MiB tensor
    per block and role cost 5-20 ms of page faults per Pythia chunk)."""
    src, prof = neox
    plan = plan_conversion(str(src), profile=str(prof))
    w = {k: v.to(torch.bfloat16) for f in plan.checkpoint.files for k, v in load_file(src / f).items()}
    made: list[str] = []
    take = Scratch.take

    def counting(self, role, shape, dtype, device):
        before = self._buffers.get(role)
        t = take(self, role, shape, dtype, device)
        if self._buffers[role] is not before:
            made.append(role)
        return t

    monkeypatch.setattr(Scratch, "take", counting)
    x, h = torch.randn(7, 64), torch.randn(7, 64)
    for block in (48, 8):  # 2 and 12 blocks
        made.clear()
        folded_ffn(plan.spec, x, h, w, block)
        assert sorted(made) == ["acc", "down", "up", "up out"], (block, made)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_in_place_is_the_same_kernel(name):
    x = torch.randn(1000) * 4
    y = x.clone()
    out = activation(name, y, inplace=True)
    assert out.data_ptr() == y.data_ptr() and torch.equal(y, activation(name, x))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox", "gemma3_text"])
def test_projections_are_stacked_once_without_copies(checkpoint, family):
    """q, k and v of one input are one matmul: their weights stacked once for all chunks (the separate names
    are views of the stack, so nothing is held twice), and the rows are those of the unstacked weights."""
    plan = plan_conversion(str(checkpoint(family)), dtype="float32")
    spec = plan.spec
    w = _layer0_weights(plan, torch.device("cpu"))
    groups = projection_groups(spec, w)
    assert [p for g in groups for p in g] == list(spec.projections)
    for g in groups:
        if len(g) > 1:
            stacked = w["+".join(p.weight for p in g)]
            assert all(w[p.weight].data_ptr() >= stacked.data_ptr() and w[p.weight]._base is stacked for p in g)
    if len(spec.projections) > 1:
        assert any(len(g) > 1 for g in groups), "separate q/k/v projections must share a matmul"
    plain = {n: t.clone() for n, t in w.items() if "+" not in n}
    emb = plan.checkpoint.rows(spec.embedding_tensor, 0, 37)
    args = (spec, plan.layout, emb)
    assert torch.equal(compute_rows(*args, w, plan.model_dtype, plan.compute_dtype),
                       compute_rows(*args, plain, plan.model_dtype, plan.compute_dtype))
    assert stack_projections(spec, plain).keys() >= plain.keys()


_HEAP_KEPT_SCRIPT = """
import os, resource
import pytest, torch
from precompile.io import process_memory as process
from precompile.io.process_memory import heap_kept
from precompile.io.signals import install_interrupt_handler

def faults(n=6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(16 << 20)  # 64 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

pages = 6 * (64 << 20) // resource.getpagesize()
small_pages = os.environ.get(process.THP_ENV, "0") == "0"  # huge pages fault in 2 MiB at a time
with heap_kept():  # as in a library caller (cli.run, tested elsewhere, opts in)
    assert faults() > pages // 2 or not small_pages, "not opted in: nothing changes"
install_interrupt_handler()  # what makes this process the program
with pytest.raises(RuntimeError), heap_kept():
    raise RuntimeError("undone on the way out, too")
assert faults() > pages // 2 or not small_pages, "undone on the way out"
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_heap_kept_is_scoped_to_the_program():
    """heap_kept changes nothing for a library caller (only the program opts in), and what it changes is undone
    on the way out, exceptions included: outside it, glibc unmaps freed blocks this large and each one faults
    every page in anew. In a fresh interpreter: glibc's thresholds are process state that earlier tests in this
    process may have moved. How many faults it saves inside is a measurement, not a test: bench_convert.py
    reports the conversion's faults (README, Performance)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-c", _HEAP_KEPT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_scratch_reuses_and_grows():
    s = Scratch()
    a = s.take("r", (4, 8), torch.float32, torch.device("cpu"))
    assert s.take("r", (2, 8), torch.float32, torch.device("cpu")).data_ptr() == a.data_ptr()
    assert s.take("r", (8, 8), torch.float32, torch.device("cpu")).numel() == 64
    t = torch.ones(3)
    assert s.cast("c", t, torch.float32) is t
    assert torch.equal(s.cast("c", t, torch.bfloat16), t.to(torch.bfloat16))


@pytest.mark.numeric
def test_parallel_block_conversion_matches_in_memory_path(neox, tmp_path, monkeypatch):
    """With FFN blocks smaller than the FFN, the streamed table still equals the in-memory one."""
    src, prof = neox
    monkeypatch.setattr(importlib.import_module("precompile.convert"), "FFN_BLOCK", 40)
    assert FFN_BLOCK >= 1024  # the default streams large FFNs only
    res = convert(str(src), tmp_path / "out", profile=str(prof), chunk_size=32)
    ref = _in_memory_table(res.plan, 32)
    got = load_file(tmp_path / "out" / TABLE_FILE)[res.plan.layout.tensor_name]
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_non_finite_rows_are_found():
    from precompile.convert import _first_non_finite

    out = torch.randn(6, 5).to(torch.bfloat16)
    assert _first_non_finite(out) is None
    out[4, 2] = float("inf")
    out[5, 0] = float("nan")
    assert _first_non_finite(out) == 4
    big = torch.full((2, 4), 3e38, dtype=torch.bfloat16)  # finite values whose row sum overflows
    assert _first_non_finite(big) is None
    for bad in (float("nan"), float("-inf"), float("inf")):  # each alone, in the model dtypes
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            one = torch.zeros(5, 3, dtype=dtype)
            one[3, 1] = bad
            assert _first_non_finite(one) == 3, (bad, dtype)
