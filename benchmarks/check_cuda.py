"""The CUDA table against the CPU table, on the benchmark's shapes: the device check for a lent GPU.

For each run (the shapes of bench_convert.py: Mistral-7B, the 262k-vocabulary gemma3_text, Pythia-6.9B),
builds the synthetic bfloat16 checkpoint, converts it with `--device cuda` and with `--device cpu` (each
in its own `precompile convert` subprocess, timed), and then, on the two tables:

- how many rows are byte-identical (matrix kernels round differently on another device, so some may
  not be), and the largest difference in ulps of the stored value;
- every row of the CUDA table against the float64 recomputation from the source's weights, within
  the derived rounding bound that `precompile verify --rows all` applies (precompile/check/row_check.py);
  the CPU table too, for comparison.

It exits 1 when a row of either table is outside the bound. Run it where `torch.cuda.is_available()`;
`--device cpu` runs both conversions on the CPU (a rehearsal of the script itself, not a device check).

Usage: python benchmarks/check_cuda.py [--runs mistral:2,gemma3:2:65536,pythia:2:8192] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import ROOT, SHAPES, build_checkpoint, parse_runs  # noqa: E402

from precompile.check.row_check import check_rows, ulp  # noqa: E402
from precompile.plan.conversion_plan import plan_conversion  # noqa: E402
from precompile.plan.table_layout import TABLE_FILE, layer0_tensor_names  # noqa: E402

CHUNK = 8192  # rows compared at a time


def convert(src: Path, out: Path, device: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "precompile", "convert", str(src), str(out), "--device", device, "-q"],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t


def compare_tables(a: Path, b: Path, name: str) -> tuple[int, int, float]:
    """(rows, byte-identical rows, largest |a - b| in ulps of a) of two table files, chunk by chunk."""
    same, worst, rows = 0, 0.0, 0
    with safe_open(a, framework="pt") as fa, safe_open(b, framework="pt") as fb:
        sa, sb = fa.get_slice(name), fb.get_slice(name)
        rows = sa.get_shape()[0]
        for start in range(0, rows, CHUNK):
            x, y = sa[start:start + CHUNK], sb[start:start + CHUNK]
            same += int((x.view(torch.int16 if x.element_size() == 2 else torch.int32) ==
                         y.view(torch.int16 if y.element_size() == 2 else torch.int32)).all(dim=-1).sum())
            x64, y64 = x.double(), y.double()
            worst = max(worst, float(((x64 - y64).abs() / ulp(x64, x.dtype)).max()))
    return rows, same, worst


def row_check(src: Path, out: Path, device: torch.device) -> tuple[int, int, float]:
    """(rows, rows outside the bound, largest element ratio to the bound) of out's table, every row."""
    plan = plan_conversion(str(src), scratch=out.parent)
    spec, layout, ckpt = plan.spec, plan.layout, plan.checkpoint
    w64 = {n: ckpt.get(n).to(device=device, dtype=torch.float64)
           for n in layer0_tensor_names(spec, frozenset(ckpt.tensors))}
    with safe_open(out / TABLE_FILE, framework="pt") as tf:
        table = tf.get_slice(layout.tensor_name)
        stats = check_rows(spec, layout, lambda a, b: ckpt.rows(spec.embedding_tensor, a, b),
                           lambda a, b: table[a:b], w64, None, plan.model_dtype, plan.compute_dtype, device=device)
    return stats.checked, len(stats.failed_ids), stats.max_elem_ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="mistral:2,gemma3:2:65536,pythia:2:8192",
                    help="SHAPE:LAYERS[:VOCAB],... as bench_convert.py (shapes: %s)" % ", ".join(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here (torch.cuda.is_available() is False); --device cpu rehearses the script")
    check_dev = torch.device(args.device)
    print(f"torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU only (rehearsal)'}", flush=True)
    ok = True
    for shape, layers, vocab in parse_runs(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix="precompile-cuda-", dir=args.tmp))
        try:
            saved = SHAPES[shape]["config"]["vocab_size"]
            SHAPES[shape]["config"]["vocab_size"] = vocab or saved
            try:
                build_checkpoint(shape, layers, tmp / "src")
            finally:
                SHAPES[shape]["config"]["vocab_size"] = saved
            t_dev = convert(tmp / "src", tmp / "dev", args.device)
            t_cpu = convert(tmp / "src", tmp / "cpu", "cpu")
            name = plan_conversion(str(tmp / "src"), scratch=tmp).layout.tensor_name
            rows, same, worst = compare_tables(tmp / "cpu" / TABLE_FILE, tmp / "dev" / TABLE_FILE, name)
            checks = {d: row_check(tmp / "src", tmp / d, check_dev) for d in ("dev", "cpu")}
            good = all(c[1] == 0 for c in checks.values())
            ok &= good
            print(f"{shape}:{layers}:{rows}: convert {args.device} {t_dev:.1f}s, cpu {t_cpu:.1f}s; "
                  f"{same}/{rows} rows byte-identical, largest difference {worst:.1f} ulp; "
                  + "; ".join(f"{'device' if d == 'dev' else 'cpu'} table: {c[1]} of {c[0]} rows outside the "
                              f"bound (largest element at {c[2]:.3f} of it)" for d, c in checks.items())
                  + ("" if good else "  FAILED"), flush=True)
        finally:
            shutil.rmtree(tmp)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
