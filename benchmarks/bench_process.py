"""What the `precompile` program's process tuning buys: the same conversion through the library's
CLI function alone and through the program, interleaved, in one run.

`precompile.cli.main` is the command line without precompile/io/process_memory.py's tuning (what a Python
caller of the CLI function gets); `python -m precompile` is the program (`precompile.cli.run`):
transparent huge pages for torch's large CPU tensors and no final garbage collection at exit.
Both convert the same synthetic checkpoint (benchmarks/bench_convert.py's shapes, read from an
HF cache) on the CPU, alternating which goes first, and the medians of wall time, time after
start-up and peak RssAnon are printed with their ratios.

Usage: python benchmarks/bench_process.py [--shape mistral] [--layers 2] [--vocab N] [--repeat 10] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench_convert import PROGRAM, SHAPES, build_checkpoint, into_hub_cache, run_convert

ENTRIES = {
    "main (library CLI function)": [sys.executable, "-c",
                                    "import sys; sys.argv[0] = 'precompile'; from precompile.cli import main; main()"],
    "run (the program)": PROGRAM,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mistral", choices=["mistral", "pythia"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (shorter runs)")
    ap.add_argument("--repeat", type=int, default=10, help="conversions per entry point (medians)")
    ap.add_argument("--tmp", default=None, help="where to build the checkpoint (default: system temp dir)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.vocab:
        SHAPES[args.shape]["config"]["vocab_size"] = args.vocab
    conv = argparse.Namespace(device="cpu", chunk_size=4096, link="auto")
    results: dict[str, list[dict]] = {name: [] for name in ENTRIES}
    with tempfile.TemporaryDirectory(prefix="bench-process-", dir=args.tmp) as tmpd:
        tmp = Path(tmpd)
        build_checkpoint(args.shape, args.layers, tmp / "ckpt")
        into_hub_cache(tmp / "ckpt", tmp / "hf", f"bench/{args.shape}")
        env = {"HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
        for i in range(args.repeat):
            order = list(ENTRIES) if i % 2 == 0 else list(reversed(ENTRIES))
            for name in order:
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                r = run_convert(f"bench/{args.shape}", out, conv, None, env, entry=ENTRIES[name])
                results[name].append(r)
                print(f"{name}: {r['wall']:.2f}s wall, {r['inproc']:.2f}s after start-up, "
                      f"peak RssAnon {r['rss_anon'] / 2**20:.0f} MiB", flush=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in ("wall", "inproc", "rss_anon")}
           for name, rs in results.items()}
    vocab = SHAPES[args.shape]["config"]["vocab_size"]
    print(f"\n{args.shape}, {args.layers} layers, vocab {vocab}, medians of {args.repeat}:")
    for name, m in med.items():
        print(f"  {name:28s} {m['wall']:6.2f}s wall  {m['inproc']:6.2f}s after start-up  "
              f"peak RssAnon {m['rss_anon'] / 2**20:.0f} MiB")
    base, prog = med[list(ENTRIES)[0]], med[list(ENTRIES)[1]]
    print(f"  run / main: wall {prog['wall'] / base['wall']:.3f}x, "
          f"after start-up {prog['inproc'] / base['inproc']:.3f}x, "
          f"peak RssAnon {prog['rss_anon'] / base['rss_anon']:.3f}x")


if __name__ == "__main__":
    main()
