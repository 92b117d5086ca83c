"""Conversion against its physical limits: `cp -r`, the bare table matmuls, convert, peak RssAnon.

Builds synthetic bfloat16 checkpoints with the real shapes of Mistral-7B (serial block, GQA 32/8,
d 4096, SwiGLU 14336, vocab 32000), Pythia-6.9B (parallel block, MHA, d 4096, MLP 16384,
vocab 50432) and a 262k-vocabulary gemma3_text model (d 640, 4 heads / 1 kv head of 256, q/k norms,
tied head), sharded like the published ones (layer 0 in the first shard, ~1 GiB shards), with
a chosen number of layers, in a temporary directory that is removed afterwards. Then, in one run:

The checkpoint is read as `precompile convert org/name` reads it, from a Hugging Face cache
(`--source hub`: blobs named by their sha256, so the manifest's source hashes cost nothing), or
from a plain directory (`--source dir`: every source byte is hashed for the manifest as well).
Run with `--tmp` on a copy-on-write filesystem (XFS, Btrfs) to see shared shards cloned for free.

- cp:      `cp -rL --reflink=never` of the checkpoint (the copy throughput of this disk), right before each
           convert: the median;
- matmul:  the bare table matmuls (same FLOPs, device and dtype as convert's compute, into output
           buffers allocated once), timed right before the first convert and right after each (a
           shared machine's speed drifts): the median;
- convert: `python -m precompile convert` in a subprocess, wall time (the median of --repeat runs);
- peak RssAnon of that subprocess, sampled from /proc/PID/status every 5 ms;
- self-check: convert's own check of layer 0 against transformers (its reference, transformers' own layer 0,
           runs beside the last shard copies, or beside the table on CUDA; the comparison runs last, before OUT_DIR is
           moved into place): its time as convert reports it, the part of it after the weights are written
           (its first log line to its summary), and the peak RssAnon from its first log line on, next to the
           peak before it;
- phases:  the table and the shards (written beside it) from convert's progress log, the self-check;
           the subprocess's CPU time (user, system) and minor page faults (os.wait4), which a shared
           machine's load disturbs far less than the wall times;
- ratios:  convert / (cp time of the bytes convert writes + matmul), convert / max(cp, matmul) (what
           full overlap would reach), and more-layers vs fewer-layers memory;
           shards cloned by reflink or hard-linked are not written, so they are not in the cp baseline.

Usage: python benchmarks/bench_convert.py [--runs mistral:2,mistral:6,gemma3:2,pythia:2:8192]
       [--shapes mistral,pythia --layers 2,8] [--source hub|dir] [--repeat N] [--device auto] [--tmp DIR]
The default runs are issue 28's acceptance set (Pythia on the first 8192 rows of its vocabulary: its
bare matmuls alone are 11x Mistral's); SHAPE:LAYERS:VOCAB sets a run's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from precompile.io.hashed_copy import file_sha256  # noqa: E402
from precompile.io.safetensors_files import write_header  # noqa: E402

SHARD_BYTES = 1 << 30

GPT_NEOX_PROFILE = (ROOT / "configs" / "gpt_neox.yaml").read_text()  # the shipped profile

SHAPES = {
    "mistral": dict(config=dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=4096,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                intermediate_size=14336, vocab_size=32000, rms_norm_eps=1e-5, hidden_act="silu",
                                tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=10000.0,
                                sliding_window=4096, torch_dtype="bfloat16"),
                    label="Mistral-7B (serial, GQA 32/8)"),
    "pythia": dict(config=dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", hidden_size=4096,
                               num_attention_heads=32, intermediate_size=16384, vocab_size=50432,
                               layer_norm_eps=1e-5, hidden_act="gelu", use_parallel_residual=True, rotary_pct=0.25,
                               rotary_emb_base=10000, tie_word_embeddings=False, max_position_embeddings=2048,
                               torch_dtype="bfloat16"),
                   label="Pythia-6.9B (parallel, MHA)"),
    "gemma3": dict(config=dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=640,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=256, intermediate_size=2048,
                               vocab_size=262144, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                               tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
                               query_pre_attn_scalar=256, sliding_window=512, torch_dtype="bfloat16"),
                   label="262k vocabulary (gemma3_text: d 640, 4/1 heads of 256, tied head)"),
}


def tensor_list(shape: str, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the published checkpoints' order: embedding, layers, final norm, head."""
    c = SHAPES[shape]["config"]
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    out: list[tuple[str, tuple[int, ...]]] = []
    if shape == "mistral":
        e = c["num_key_value_heads"] * c["head_dim"]
        out.append(("model.embed_tokens.weight", (v, d)))
        for i in range(layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)),
                    (p + "self_attn.k_proj.weight", (e, d)), (p + "self_attn.v_proj.weight", (e, d)),
                    (p + "self_attn.o_proj.weight", (d, d)), (p + "post_attention_layernorm.weight", (d,)),
                    (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                    (p + "mlp.down_proj.weight", (d, f))]
        out += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    elif shape == "gemma3":
        hd = c["head_dim"]
        q, e = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        out.append(("model.embed_tokens.weight", (v, d)))
        for i in range(layers):
            p = f"model.layers.{i}."
            out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                    (p + "self_attn.k_proj.weight", (e, d)), (p + "self_attn.v_proj.weight", (e, d)),
                    (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
                    (p + "self_attn.o_proj.weight", (d, q)), (p + "post_attention_layernorm.weight", (d,)),
                    (p + "pre_feedforward_layernorm.weight", (d,)), (p + "post_feedforward_layernorm.weight", (d,)),
                    (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                    (p + "mlp.down_proj.weight", (d, f))]
        out.append(("model.norm.weight", (d,)))  # tied: the head is the embedding
    else:
        out.append(("gpt_neox.embed_in.weight", (v, d)))
        for i in range(layers):
            p = f"gpt_neox.layers.{i}."
            out += [(p + "input_layernorm.weight", (d,)), (p + "input_layernorm.bias", (d,)),
                    (p + "post_attention_layernorm.weight", (d,)), (p + "post_attention_layernorm.bias", (d,)),
                    (p + "attention.query_key_value.weight", (3 * d, d)),
                    (p + "attention.query_key_value.bias", (3 * d,)),
                    (p + "attention.dense.weight", (d, d)), (p + "attention.dense.bias", (d,)),
                    (p + "mlp.dense_h_to_4h.weight", (f, d)), (p + "mlp.dense_h_to_4h.bias", (f,)),
                    (p + "mlp.dense_4h_to_h.weight", (d, f)), (p + "mlp.dense_4h_to_h.bias", (d,))]
        out += [("gpt_neox.final_layer_norm.weight", (d,)), ("gpt_neox.final_layer_norm.bias", (d,)),
                ("embed_out.weight", (v, d))]
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def build_checkpoint(shape: str, layers: int, root: Path) -> int:
    """Write the checkpoint chunk by chunk (never a whole tensor in memory); returns its weight bytes."""
    root.mkdir(parents=True)
    cfg = dict(SHAPES[shape]["config"], num_hidden_layers=layers)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)  # 32 MiB of weights, reused
    pool_raw = pool.view(torch.uint8).numpy()
    ones = (1 + torch.randn(1 << 16, generator=g) * 0.02).to(torch.bfloat16)

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensor_list(shape, layers):
        nbytes = _numel(shp) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:  # the embedding and layer 0 fit in the first shard
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        with open(root / fname, "wb") as f:
            write_header(f, [(t, "BF16", s, _numel(s) * 2) for t, s in tensors], {"format": "pt"})
            for t, s in tensors:
                weight_map[t] = fname
                nbytes = _numel(s) * 2
                if len(s) == 1:  # norms near 1, biases small
                    src = ones if t.endswith("norm.weight") else pool
                    f.write(src[: s[0]].view(torch.uint8).numpy().tobytes())
                    continue
                done, off = 0, (zlib.crc32(t.encode()) % 1024) * 2
                while done < nbytes:
                    k = min(len(pool_raw) - off, nbytes - done)
                    f.write(pool_raw[off: off + k])
                    done += k
                    off = 0
    total = sum(_numel(s) * 2 for _, s in tensor_list(shape, layers))
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def into_hub_cache(src: Path, hf_home: Path, repo_id: str) -> Path:
    """Move a checkpoint into an HF cache as huggingface_hub lays it out; returns the snapshot directory."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / file_sha256(f)
        os.rename(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    src.rmdir()
    return snap


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())  # follows the snapshot's links


def time_cp(src: Path, dst: Path) -> float:
    os.sync()
    t = time.perf_counter()
    subprocess.run(["cp", "-rL", "--reflink=never", str(src), str(dst)], check=True)  # a real copy, even on XFS
    secs = time.perf_counter() - t
    shutil.rmtree(dst)
    return secs


def bare_matmul_seconds(shape: str, device: torch.device, chunk: int) -> tuple[float, float]:
    """The table's matmuls alone (float32, same chunking and device as convert); returns (s, TFLOP)."""
    c = SHAPES[shape]["config"]
    d, v = c["hidden_size"], c["vocab_size"]
    g = torch.Generator().manual_seed(1)
    if shape in ("mistral", "gemma3"):
        q, e = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
        mats = [[torch.randn(q + 2 * e, d, generator=g)]]
    else:
        f = c["intermediate_size"]
        mats = [[torch.randn(3 * d, d, generator=g)], [torch.randn(f, d, generator=g), torch.randn(d, f, generator=g)]]
    mats = [[m.to(device) for m in chain] for chain in mats]
    # outputs go into buffers allocated once: the limit is the arithmetic, not the allocator's page faults
    outs = [[torch.empty(chunk, m.shape[0], device=device) for m in chain] for chain in mats]
    flops = 0
    x = torch.randn(chunk, d, generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for start in range(0, v, chunk):
        n = min(chunk, v - start)
        for chain, bufs in zip(mats, outs):
            h = x[:n]
            for m, buf in zip(chain, bufs):
                h = torch.matmul(h, m.t(), out=buf[:n])
                flops += 2 * n * m.shape[0] * m.shape[1]
    sync()
    return time.perf_counter() - t, flops / 1e12


PROGRAM = [sys.executable, "-m", "precompile"]  # the `precompile` command: precompile.cli.run


def run_convert(source: str, out: Path, args, profile: Path | None, env: dict, entry: list[str] = PROGRAM) -> dict:
    """convert in a subprocess; wall time and peak RssAnon (sampled every 5 ms), VmHWM for reference."""
    cmd = [*entry, "convert", source, str(out), "--device", args.device,
           "--chunk-size", str(args.chunk_size), "--link", args.link]
    if profile:
        cmd += ["--profile", str(profile)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    os.sync()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"RssAnon": 0, "VmHWM": 0}
    samples: list[tuple[float, int]] = []  # (time, RssAnon): the self-check's share of the peak
    lines: list[tuple[float, str]] = []  # stderr lines with the time they arrived
    done = threading.Event()

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) * 1024)
                        if key == "RssAnon":
                            samples.append((time.perf_counter(), int(line.split()[1]) * 1024))
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stderr:
        lines.append((time.perf_counter(), line))
    _, status, usage = os.wait4(proc.pid, 0)  # the child's CPU time and page faults, as proc.wait() would not
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    stderr = "".join(line for _, line in lines)
    if proc.returncode != 0:
        raise SystemExit(f"convert failed ({proc.returncode}):\n{stderr[-3000:]}")
    m = re.search(r"in ([0-9.]+)s\s*$", stderr.strip())
    # "shards: 1 rewritten (1004.2 MiB), 7 cloned by reflink (2637.5 MiB)": clones and links write nothing
    unwritten = sum(float(mib) for mib in re.findall(r"\d+ (?:cloned by reflink|hard-linked) \(([0-9.]+) MiB\)",
                                                      stderr)) * 2**20
    shards = re.search(r"^shards: .*$", stderr, re.M)
    sc_start = next((at for at, line in lines if line.startswith("self-check: layer 0 against")), float("inf"))
    sc = re.search(r"^self-check: layer 0 against .*; ([0-9.]+)s$", stderr, re.M)
    # what the check adds after the weights are written: its first line to its summary (its reference may have
    # run beside the shards or the table before that)
    sc_end = next((at for at, line in lines if sc and line.rstrip("\n") == sc.group(0)), float("nan"))
    return {"wall": wall, "inproc": float(m.group(1)) if m else float("nan"), "rss_anon": peak["RssAnon"],
            "hwm": peak["VmHWM"], "log": stderr, "unwritten": unwritten, "shards": shards.group(0) if shards else "",
            "check_s": float(sc.group(1)) if sc else float("nan"), "check_line": sc.group(0) if sc else "",
            "check_after_s": sc_end - sc_start if sc else float("nan"),
            "rss_before_check": max((r for at, r in samples if at < sc_start), default=0),
            "user": usage.ru_utime, "sys": usage.ru_stime, "minflt": usage.ru_minflt,
            **{f"{k}_s": v for k, v in phases(stderr).items()},
            "rss_check": max((r for at, r in samples if at >= sc_start), default=0)}


def _filesystem(path: str) -> str:
    r = subprocess.run(["df", "--output=fstype", path], capture_output=True, text=True)
    return f"{path} on {r.stdout.split()[-1] if r.returncode == 0 else 'unknown filesystem'}"


REAL_VOCAB = {name: shape["config"]["vocab_size"] for name, shape in SHAPES.items()}
# the acceptance set: Mistral-7B at 2 and 6 layers, the 262k vocabulary, Pythia (its bare matmuls
# are 11x Mistral's, so on a slow-matmul CPU it runs on the first 8192 rows of its vocabulary by default)
DEFAULT_RUNS = "mistral:2,mistral:6,gemma3:2,pythia:2:8192"


def parse_runs(text: str) -> list[tuple[str, int, int | None]]:
    """`shape:layers[:vocab],...` -> [(shape, layers, vocab or None)]."""
    runs = []
    for item in text.split(","):
        parts = item.split(":")
        if parts[0] not in SHAPES or len(parts) not in (2, 3):
            raise SystemExit(f"bad run {item!r}: expected SHAPE:LAYERS[:VOCAB] with SHAPE one of {', '.join(SHAPES)}")
        runs.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    return runs


PHASES = {"table": r"^computing table: .* done in ([0-9.]+)s$", "shards": r"^writing shards: .* done in ([0-9.]+)s$"}


def phases(log: str) -> dict[str, float]:
    """Seconds of convert's phases, from its progress log (the self-check from its summary line)."""
    out = {k: float(m.group(1)) if (m := re.search(rx, log, re.M)) else float("nan") for k, rx in PHASES.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=None, help=f"SHAPE:LAYERS[:VOCAB],... (default {DEFAULT_RUNS}); shapes: "
                    f"{', '.join(SHAPES)}")
    ap.add_argument("--shapes", default=None, help="with --layers, instead of --runs: every shape at every layer count")
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--link", default="auto", choices=["auto", "reflink", "hardlink", "copy"])
    ap.add_argument("--vocab", type=int, default=None,
                    help="override the vocabulary size of every run (default: the real one, or the run's own; "
                         "time and matmul scale with it, memory does not)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="convert this many times per checkpoint and report medians (a shared machine drifts)")
    ap.add_argument("--source", default="hub", choices=["hub", "dir"],
                    help="read the checkpoint from an HF cache by repo id (default) or from a plain directory")
    ap.add_argument("--tmp", default=None, help="where to build the checkpoints (default: system temp dir); "
                    "OUT_DIR is written beside them")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.shapes:
        runs = [(shape, int(n), None) for shape in args.shapes.split(",") for n in args.layers.split(",")]
    else:
        runs = parse_runs(args.runs or DEFAULT_RUNS)
    print(f"device {device}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, chunk {args.chunk_size} rows, float32 compute, "
          f"--link {args.link}, source: {args.source}, {_filesystem(args.tmp or tempfile.gettempdir())}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-", dir=args.tmp) as tmpd:
        tmp = Path(tmpd)
        prof = tmp / "gpt_neox.yaml"
        prof.write_text(GPT_NEOX_PROFILE)
        for shape, n, vocab in runs:
            SHAPES[shape]["config"]["vocab_size"] = args.vocab or vocab or REAL_VOCAB[shape]
            src, out = tmp / f"{shape}-{n}", tmp / f"{shape}-{n}-out"
            t = time.perf_counter()
            size = build_checkpoint(shape, n, src)
            source, env = str(src), {}
            if args.source == "hub":
                source, env = f"bench/{shape}-{n}", {"HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
                src = into_hub_cache(src, tmp / "hf", source)
            print(f"{shape} {n} layers, vocab {SHAPES[shape]['config']['vocab_size']}: built "
                  f"{size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f}s", flush=True)
            # convert --repeat times, each right after a cp (a shared machine's load hits both alike);
            # the bare matmuls before the first convert and after each: medians of each
            mm, tflop = bare_matmul_seconds(shape, device, args.chunk_size)
            mms = [mm]
            ckpt_bytes = tree_bytes(src)
            runs_, cps = [], []
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                cps.append(time_cp(src, tmp / "cp"))
                runs_.append(run_convert(source, out, args, prof if shape == "pythia" else None, env))
                mm, tflop = bare_matmul_seconds(shape, device, args.chunk_size)
                mms.append(mm)
            mm_s, cp_s = statistics.median(mms), statistics.median(cps)

            def med(key: str) -> float:
                return statistics.median(x[key] for x in runs_)

            r = dict(runs_[-1], **{k: med(k) for k in ("wall", "inproc", "check_s", "check_after_s", "table_s",
                                                       "shards_s", "user", "sys", "minflt")},
                     rss_anon=max(x["rss_anon"] for x in runs_), hwm=max(x["hwm"] for x in runs_),
                     rss_check=max(x["rss_check"] for x in runs_),
                     rss_before_check=max(x["rss_before_check"] for x in runs_))
            written = tree_bytes(out) - r["unwritten"]
            cp_written = cp_s * written / ckpt_bytes
            target = cp_written + mm_s
            rows.append(dict(shape=shape, layers=n, vocab=SHAPES[shape]["config"]["vocab_size"],
                             gib=ckpt_bytes / 2**30, cp=cp_s, written=written, cp_written=cp_written, mm=mm_s,
                             conv=r["wall"], inproc=r["inproc"], ratio=r["wall"] / target,
                             ratio_in=r["inproc"] / target, ratio_max=r["wall"] / max(cp_written, mm_s),
                             rss=r["rss_anon"], hwm=r["hwm"], check_s=r["check_s"],
                             check_after_s=r["check_after_s"], rss_check=r["rss_check"],
                             rss_before_check=r["rss_before_check"], table_s=r["table_s"], shards_s=r["shards_s"],
                             user=r["user"], sys=r["sys"], minflt=r["minflt"]))
            each = ", ".join(f"{x['wall']:.1f}" for x in runs_)
            print(f"  cp -rL {cp_s:.1f}s (median of {', '.join(f'{c:.1f}' for c in cps)}; "
                  f"{ckpt_bytes / cp_s / 2**30:.2f} GiB/s); bare table matmuls "
                  f"{tflop:.2f} TFLOP in {mm_s:.1f}s (median of {', '.join(f'{m:.1f}' for m in mms)}; "
                  f"{tflop / mm_s * 1e3:.0f} GFLOP/s); convert wrote {written / 2**30:.2f} GiB: "
                  f"{r['wall']:.1f}s wall (median of {each}; {r['inproc']:.1f}s after start-up), "
                  f"peak RssAnon {r['rss_anon'] / 2**20:.0f} MiB, VmHWM {r['hwm'] / 2**20:.0f} MiB\n"
                  f"  phases: table {r['table_s']:.1f}s, shards {r['shards_s']:.1f}s (beside the table), "
                  f"self-check {r['check_s']:.1f}s ({r['check_after_s']:.1f}s after the weights); "
                  f"CPU user {r['user']:.1f}s, system {r['sys']:.1f}s, "
                  f"{r['minflt'] / 1e3:.0f}k minor page faults\n"
                  f"  {r['shards']}\n  {r['check_line']}\n  self-check {r['check_s']:.1f}s of the convert, "
                  f"peak RssAnon {r['rss_check'] / 2**20:.0f} MiB during it, "
                  f"{r['rss_before_check'] / 2**20:.0f} MiB before it", flush=True)
            shutil.rmtree(tmp / "hf" if args.source == "hub" else src)
            shutil.rmtree(out)
    print()
    print("| shape | layers | vocab | ckpt GiB | cp(written) s | matmul s | convert s (after start-up) | "
          "convert / (cp + matmul) (after start-up) | convert / max(cp, matmul) | table s | shards s | self-check s "
          "(after the weights) | user / sys s | minor faults | peak RssAnon MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['layers']} | {r['vocab']} | {r['gib']:.2f} | {r['cp_written']:.1f} | {r['mm']:.1f} "
              f"| {r['conv']:.1f} ({r['inproc']:.1f}) | {r['ratio']:.2f} ({r['ratio_in']:.2f}) | {r['ratio_max']:.2f} "
              f"| {r['table_s']:.1f} | {r['shards_s']:.1f} | {r['check_s']:.1f} ({r['check_after_s']:.1f}) "
              f"| {r['user']:.1f} / {r['sys']:.1f} "
              f"| {r['minflt'] / 1e3:.0f}k | {r['rss'] / 2**20:.0f} |")
    print()
    ok = True
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        for r in rs:
            goal = 1.10 if shape == "mistral" and r["layers"] >= 6 else 1.25
            good = r["ratio"] <= goal and r["rss"] <= 1.5e9
            ok &= good
            print(f"{shape} {r['layers']} layers: time ratio {r['ratio']:.2f} wall, {r['ratio_in']:.2f} after "
                  f"start-up (goal <= {goal:.2f} on a fast-matmul machine), {r['ratio_max']:.2f} of max(cp, matmul); "
                  f"peak RssAnon {r['rss'] / 1e9:.2f} GB (goal <= 1.5) {'ok' if good else 'MISSED'}")
        if len(rs) > 1:
            lo, hi = rs[0], rs[-1]
            mem = hi["rss"] / lo["rss"]
            ok &= mem <= 1.10
            print(f"{shape}: peak RssAnon {hi['layers']} vs {lo['layers']} layers: {mem:.3f}x (goal <= 1.10)")
    print("all goals met" if ok else "some goals missed")


if __name__ == "__main__":
    main()
