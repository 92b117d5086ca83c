"""Run-time gain on a synthetic Pythia-6.9B-shaped model with few layers (default 4), on CPU or CUDA.

Builds the bfloat16 checkpoint chunkwise with safetensors (the real Pythia-6.9B shapes: parallel
block, MHA 32 heads, d 4096, MLP 16384, vocab 50432; only the layer count is reduced), converts
it with `precompile.convert`, then runs `precompile.check.bench`: the same model with and without the
swapped layer-0 modules in one process, interleaved repetitions, medians, next to the
theoretical saving. Everything lives in a temporary directory removed at the end.

Targets (CPU): decode at batch 1 realizes >= 70% of the theoretical saving; layer 0 alone is
>= 5x faster at batch 1.

Usage: python benchmarks/bench_runtime.py [--layers 4] [--vocab 50432] [--reps 3] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_convert import GPT_NEOX_PROFILE, SHAPES, build_checkpoint  # noqa: E402

from precompile import convert  # noqa: E402
from precompile.check.bench import bench  # noqa: E402
from precompile.io.progress import Progress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (default: 50432)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=3, help="least repetitions")
    ap.add_argument("--max-reps", type=int, default=100)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of repetitions at most")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    if args.vocab:
        SHAPES["pythia"]["config"]["vocab_size"] = args.vocab
    progress = Progress()
    with tempfile.TemporaryDirectory(prefix="bench-runtime-", dir=args.tmp) as tmpd:
        tmp = Path(tmpd)
        (tmp / "gpt_neox.yaml").write_text(GPT_NEOX_PROFILE)
        t = time.perf_counter()
        size = build_checkpoint("pythia", args.layers, tmp / "src")
        progress.log(f"built a {args.layers}-layer Pythia-6.9B-shaped checkpoint ({size / 2**30:.2f} GiB, vocab "
                     f"{SHAPES['pythia']['config']['vocab_size']}) in {time.perf_counter() - t:.0f}s")
        convert(str(tmp / "src"), tmp / "out", profile=str(tmp / "gpt_neox.yaml"), device=args.device,
                progress=progress)
        result = bench(tmp / "out", str(tmp / "src"), device=args.device,
                       batches=tuple(int(b) for b in args.batches.split(",")), prompt_len=args.prompt_len,
                       decode_tokens=args.decode_tokens, reps=args.reps, max_reps=args.max_reps,
                       budget=args.budget, progress=progress)
    print()
    print("\n".join(result.summary()))
    print(result.table())
    for note in result.notes:
        print(note)
    decode = result.realized("decode b1")
    layer0 = result.speedup("layer 0 decode b1")
    if decode is None:
        print("decode b1: unresolved (the saving's interval is wider than the theoretical saving)")
    else:
        print(f"decode b1 realizes {decode:.0%} of the theoretical saving (target >= 70%): "
              f"{'ok' if decode >= 0.7 else 'MISSED'}")
    print(f"layer 0 at batch 1 is {layer0:.1f}x faster (target >= 5x): {'ok' if layer0 >= 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
