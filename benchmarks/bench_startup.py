"""How fast the commands that need no model start: wall time of each against `python -c pass`, in one run.

`precompile --help`, `--version`, `profiles` and `plan` on a config.json (a directory without weights)
import neither torch nor transformers (tests/test_startup.py checks that); this measures what they cost
next to the interpreter's own start-up, and next to `import click`, which every command pays. Every
command runs --repeat times, interleaved (a different order each round) so that a busy machine slows all
of them alike, and the medians are printed with their ratio to `python -c pass` (issue 20's target: 3x).
Bytecode is cached (in a temporary PYTHONPYCACHEPREFIX, warmed by one run of each command first), as for
an installed package, even where PYTHONDONTWRITEBYTECODE is set.

Usage: python benchmarks/bench_startup.py [--repeat 21]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commands(config_dir: Path) -> dict[str, list[str]]:
    program = [sys.executable, "-m", "precompile"]
    return {"python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import click'": [sys.executable, "-c", "import click"],
            "precompile --help": [*program, "--help"],
            "precompile --version": [*program, "--version"],
            "precompile profiles": [*program, "profiles"],
            "precompile plan DIR (config.json only)": [*program, "plan", str(config_dir)]}


def wall(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=21, help="runs of each command (medians)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmpd:
        env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "PYTHONPATH": str(ROOT),
               "HF_HUB_OFFLINE": "1", "PYTHONPYCACHEPREFIX": str(Path(tmpd) / "pycache")}
        config_dir = Path(tmpd) / "model"
        config_dir.mkdir()
        shutil.copy(ROOT / "examples" / "tiny-llama" / "config.json", config_dir / "config.json")
        cmds = commands(config_dir)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        rng = random.Random(0)
        for cmd in cmds.values():  # warm the page cache and write the .pyc files
            wall(cmd, env)
        for _ in range(args.repeat):
            order = list(cmds)
            rng.shuffle(order)
            for name in order:
                times[name].append(wall(cmds[name], env))
    base = statistics.median(times["python -c pass"])
    print(f"median of {args.repeat} interleaved runs, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    width = max(map(len, times))
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<{width}}  {med * 1e3:7.1f} ms  {med / base:5.2f}x")


if __name__ == "__main__":
    main()
