"""Benchmarks for `precompile verify`.

`rss`: peak RSS of verify next to the model's size, for a synthetic Llama-shaped bfloat16 checkpoint of
at least 1 GB, against a baseline measured in the same run: a process that only loads the converted
model (precompile.load) and runs one forward pass. Verify should stay near that baseline (one model plus
the eliminated tensors), not near two models.

`rows-all`: time of the table-rows check over every row of a Llama-3-8B-shaped table
([128256 x 4096] embedding, 32 heads / 8 kv heads of 128: rows of 4096 + 4096 + 1024 + 1024 = 10240
values in bfloat16). A synthetic checkpoint holding the embedding and layer 0 only (config.json says
32 layers; only layer 0 is read) is converted with `precompile.convert`, then `check_table_rows` is timed
on every row (or on --rows N of them, extrapolated per row: the work is the same for every row).

    python benchmarks/bench_verify.py rss [--layers 9]
    python benchmarks/bench_verify.py rows-all [--rows N]

Everything is written in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

PY = sys.executable


def synthetic_checkpoint(path: Path, config: dict, dtype: torch.dtype, only: set[str] | None = None,
                         shard_bytes: int = 500 << 20, seed: int = 0) -> int:
    """Write a Llama checkpoint of random weights (std 0.02, norms 1) without building the model in memory.

    Tensor names and shapes come from the transformers class built on the meta device. Returns bytes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    import tiny

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items() if only is None or n in only}
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    files: list[tuple[str, dict]] = []
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            files.append((name, shard))
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg_d = cfg.to_dict()
    cfg_d["architectures"] = ["LlamaForCausalLM"]
    cfg_d["dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(cfg_d))
    tiny.make_tokenizer().save_pretrained(path)
    return total


def peak_rss(code: str) -> tuple[float, str]:
    """Run code in a fresh interpreter; its peak RSS in MiB (ru_maxrss) and its last output line."""
    wrapped = code + "\nimport resource; print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([PY, "-c", wrapped], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    lines = r.stdout.strip().splitlines()
    rss = next(int(x.split()[1]) for x in lines if x.startswith("RSS "))
    return rss / 1024, "\n".join(x for x in lines if not x.startswith("RSS "))


def bench_rss(layers: int) -> None:
    from precompile import convert

    config = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                  num_key_value_heads=4, num_hidden_layers=layers, vocab_size=32000, tie_word_embeddings=False,
                  max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        nbytes = synthetic_checkpoint(tmp / "src", config, torch.bfloat16)
        print(f"synthetic checkpoint: {nbytes / 2**30:.2f} GiB bfloat16 ({time.monotonic() - t0:.0f}s)")
        convert(str(tmp / "src"), tmp / "out")
        out_bytes = sum(p.stat().st_size for p in (tmp / "out").glob("*.safetensors"))
        print(f"converted: {out_bytes / 2**30:.2f} GiB of safetensors in OUT_DIR")
        base, _ = peak_rss(f"import torch, precompile; m = precompile.load({str(tmp / 'out')!r}); "
                           f"m(torch.tensor([[1, 5, 9, 13]]))")
        runs = {}
        for label, fp32 in (("verify --no-fp32-reference", False), ("verify (default: + float32 run)", True)):
            t0 = time.monotonic()
            rss, line = peak_rss(
                f"from precompile.check.verify import verify; r = verify({str(tmp / 'out')!r}, max_new_tokens=8, "
                f"fp32_reference={fp32}); print(r['passed'], [c['name'] for c in r['checks'] if not c['passed']])")
            runs[label] = (rss, time.monotonic() - t0, line)
        mib = nbytes / 2**20
        print(f"\n{'process':<34} {'peak RSS MiB':>12} {'x model size':>12} {'x load-only':>11}  seconds")
        print(f"{'model size (safetensors)':<34} {mib:>12.0f} {1:>12.2f}")
        print(f"{'load-only baseline':<34} {base:>12.0f} {base / mib:>12.2f} {1:>11.2f}")
        for label, (rss, secs, line) in runs.items():
            print(f"{label:<34} {rss:>12.0f} {rss / mib:>12.2f} {rss / base:>11.2f}  {secs:.0f}  passed: {line}")


def bench_rows_all(n_rows: int | None) -> None:
    from precompile import convert
    from precompile.loader import read_manifest
    from precompile.profiles.catalog import select_profile
    from precompile.profiles.profile_resolution import resolve
    from precompile.io.progress import Progress
    from precompile.io.source import read_config
    from precompile.io.safetensors_files import Checkpoint
    from precompile.plan.table_layout import table_layout
    from precompile.check.verify import check_table_rows
    from precompile.check.verify_options import VerifyOptions

    config = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, num_hidden_layers=32, vocab_size=128256,
                  tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    only = {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
            *(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv")}
    with tempfile.TemporaryDirectory(prefix="bench-rows-") as tmp:
        tmp = Path(tmp)
        nbytes = synthetic_checkpoint(tmp / "src", config, torch.bfloat16, only=only)
        t0 = time.monotonic()
        convert(str(tmp / "src"), tmp / "out")
        conv_s = time.monotonic() - t0
        out = tmp / "out"
        manifest = read_manifest(out)
        cfg = read_config(tmp / "src")
        spec = resolve(select_profile(cfg), cfg)
        ref = Checkpoint(tmp / "src")
        layout = table_layout(spec, frozenset(ref.tensors))
        vocab = layout.vocab_size
        ids = None if n_rows is None else list(range(0, vocab, max(1, vocab // n_rows)))[:n_rows]
        th = VerifyOptions().thresholds()
        c = check_table_rows(out, manifest, spec, layout, ref, ids, th, torch.device("cpu"), Progress(quiet=True))
        m = c.metrics
        per_row = m["seconds"] / m["rows"]
        print(f"Llama-3-8B-shaped table [{vocab} x {layout.width}] bfloat16 ({nbytes / 2**30:.2f} GiB source "
              f"read: embedding + layer 0); conversion {conv_s:.0f}s")
        print(f"table-rows check: {m['rows']} rows in {m['seconds']:.1f}s on CPU ({torch.get_num_threads()} threads), "
              f"{per_row * 1e3:.2f} ms/row -> all {vocab} rows: {per_row * vocab / 60:.1f} min"
              f"{' (measured)' if n_rows is None else ' (extrapolated)'}; passed={c.passed}, "
              f"element ratio {m['max_element_ratio']}, row z {m['max_row_z']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rss")
    r.add_argument("--layers", type=int, default=9, help="decoder layers (9: about 1.07 GB in bfloat16)")
    a = sub.add_parser("rows-all")
    a.add_argument("--rows", type=int, default=None, help="time this many rows and extrapolate (default: all)")
    args = ap.parse_args()
    if args.what == "rss":
        bench_rss(args.layers)
    else:
        bench_rows_all(args.rows)


if __name__ == "__main__":
    main()
