"""Shared fixtures and helpers, in one place for every folder of tests/ (tests/<stage>/ mirror the package; they
import this module and tiny.py by name, pyproject's pythonpath has tests/): tiny checkpoints and their conversions
(built once per session), the laid-out offline hub, the CLI in a subprocess (run_cli, for tests of the program) or
in this process (run_cli_here, for tests of what a command does), the bad-input contract, and the comparisons with
transformers that the family tests share."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tiny
from precompile.cli import main
from precompile.convert import convert
from precompile.io.out_dir import LOCK_PREFIX, TMP_PREFIX
from precompile.loader import MANIFEST

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, dtype="float32", **config_overrides) -> a sharded HF directory (cached)."""
    made: dict = {}

    def make(family: str, dtype: str = "float32", seed: int = 0, shard_kb: int | None = 40, **overrides) -> Path:
        key = (family, dtype, seed, shard_kb, repr(sorted(overrides.items())))  # values may be lists
        if key not in made:
            d = tmp_path_factory.mktemp(f"{family}-{dtype}")
            tiny.save_checkpoint(tiny.build_model(family, seed, **overrides), d / "model", DTYPES[dtype], shard_kb)
            made[key] = d / "model"
        return made[key]

    return make


@pytest.fixture(scope="session")
def converted_family(checkpoint, tmp_path_factory):
    """converted_family(family, dtype="float32") -> (source dir, OUT_DIR), converted once per session; read-only
    (a test that damages OUT_DIR works on a copy)."""
    made: dict = {}

    def get(family: str, dtype: str = "float32") -> tuple[Path, Path]:
        if (family, dtype) not in made:
            src = checkpoint(family, dtype)
            out = tmp_path_factory.mktemp(f"pc-{family}-{dtype}") / "out"
            convert(str(src), out, device="cpu")
            made[family, dtype] = (src, out)
        return made[family, dtype]

    return get


@contextmanager
def offline_hub(home: Path | None = None):
    """huggingface_hub in this process never reaches the network (online, a look-up waits out the retries of a hub
    that cannot be reached), and reads the cache under HF_HOME `home` when given."""
    import huggingface_hub.constants as c

    with pytest.MonkeyPatch.context() as mp:
        if home is not None:
            mp.setattr(c, "HF_HUB_CACHE", str(Path(home) / "hub"))
        mp.setattr(c, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture
def offline():
    with offline_hub():
        yield


@pytest.fixture
def hub(tmp_path):
    """The laid-out hub: an offline huggingface_hub (in this process) reading the cache under the HF_HOME it
    returns (tmp_path / "hf"); tiny.lay_out_hub_cache puts checkpoints there."""
    with offline_hub(tmp_path / "hf"):
        yield tmp_path / "hf"


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m precompile ...` as a user would; the source tree comes first on the path."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "precompile", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def run_cli_here(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`precompile ...` in this process (click's runner), for tests of what a command does and says rather than of
    its process: the same returncode, stdout and stderr as run_cli, in a fraction of the time (no interpreter
    start, no torch import); an uncaught exception fails the test, as its traceback would."""
    r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(["precompile", *map(str, args)], r.exit_code, r.stdout, r.stderr)


def tree_snapshot(path: Path) -> dict[str, tuple[int, float, bytes]]:
    """Every file below path with its size, mtime and bytes: proves an input was left untouched."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(path))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out


# ---------------------------------------------------------------- bad-input helpers (the refusal tests)


@contextmanager
def fail_after(seconds: int):
    """A test that blocks (a FIFO opened for reading, a socket that never answers) fails after `seconds`
    instead of hanging the suite."""
    def fail(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def invoke(*args: str | Path):
    return CliRunner().invoke(main, ["convert", *map(str, args)])


def leftovers(*dirs: Path) -> list[str]:
    """Temporary directories and lock files a run left beside OUT_DIR (or the source)."""
    return [str(p) for d in dirs if d.is_dir() for p in d.iterdir() if p.name.startswith((TMP_PREFIX, LOCK_PREFIX))]


def check_refused(src: Path, out: Path, *extra: str, words: tuple[str, ...], source_arg: str | None = None,
                  watch: tuple[Path, ...] = ()) -> str:
    """Run convert and assert the whole contract of a refusal; returns the error line."""
    watched = [p for p in (src, *watch) if p.exists()]
    before = {p: tree_snapshot(p) for p in watched}
    out_before = tree_snapshot(out) if out.is_dir() else (out.read_bytes() if out.is_file() else None)
    r = invoke(source_arg if source_arg is not None else src, out, "--quiet", "--device", "cpu", *extra)
    assert isinstance(r.exception, SystemExit), f"uncaught {r.exception!r}:\n{r.stderr}"
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for w in words:
        assert w.lower() in lines[0].lower(), f"{w!r} not in {lines[0]!r}"
    if out_before is None:
        assert not out.exists(), f"{out} was left behind"
    elif isinstance(out_before, bytes):
        assert out.read_bytes() == out_before
    else:
        assert tree_snapshot(out) == out_before, f"{out} was changed"
    assert not leftovers(out.parent, src.parent), leftovers(out.parent, src.parent)
    for p, snap in before.items():
        assert tree_snapshot(p) == snap, f"input {p} was changed"
    return lines[0]


@pytest.fixture
def no_hang():
    """A test that blocks (a FIFO opened for reading) fails after 90 s instead of hanging the suite (modules ask
    for it with `pytestmark = pytest.mark.usefixtures("no_hang")`)."""
    with fail_after(90):
        yield


def cli_in_process(*args) -> tuple[int, str]:
    """Any command through click's runner: (exit status, stderr); an uncaught exception fails the test."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert isinstance(r.exception, SystemExit) or r.exception is None, f"uncaught {r.exception!r}\n{r.stderr}"
    return r.exit_code, r.stderr


def one_error_line(stderr: str, *words: str) -> str:
    """The last line is the one `error:` or `verification failed:` line, naming each of words."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert [ln for ln in lines if ln.startswith(("error:", "verification failed:"))] == [lines[-1]], stderr
    for w in words:
        assert w.lower() in lines[-1].lower(), f"{w!r} not in {lines[-1]!r}"
    return lines[-1]


def rehash(out: Path, *names: str) -> None:
    """Record the current sha256 (and size) of OUT_DIR files in its manifest, as a careful tamperer would."""
    def fix(m):
        for n in names:
            m["outputs"][n] = sha256_of(out / n)
            m.setdefault("output_sizes", {})[n] = (out / n).stat().st_size
    edit_json(out / MANIFEST, fix)


def verify_report(out: Path, tmp_path: Path, *extra) -> tuple[int, str, dict]:
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    code, err = cli_in_process("verify", out, "--quiet", "--device", "cpu", "--rows", "32", "--max-new-tokens", "2",
                               "--json", report, *extra)
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]} if report.exists() else {}
    return code, err, checks


def read_st(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def shard_of(src: Path, name: str) -> Path:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return src / index["weight_map"][name]


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def base(checkpoint) -> Path:
    return checkpoint("llama")


@pytest.fixture
def src(base, tmp_path) -> Path:
    return tiny.copy_tree(base, tmp_path / "src")


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


@pytest.fixture(scope="session")
def converted(converted_family) -> Path:
    """The tiny Llama's OUT_DIR, converted once per session (read-only: a test that damages it works on a copy)."""
    return converted_family("llama")[1]


@pytest.fixture(scope="module")
def slow_source(checkpoint) -> Path:
    """A tiny model with a large vocabulary: at --chunk-size 1 the table takes many seconds to write."""
    return checkpoint("llama", vocab_size=30000, shard_kb=None)


def state_dict(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def to_pickle(src: Path) -> None:
    """Turn a safetensors checkpoint into a pickle-only one (pytorch_model.bin), as older repos ship."""
    sd = state_dict(src)
    for f in list(src.glob("*.safetensors")) + [src / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    torch.save(sd, src / "pytorch_model.bin")


def make_fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- comparing with transformers (family tests)


def prompt_batch():
    """tiny.PROMPTS, left-padded into one batch."""
    return tiny.make_tokenizer()(tiny.PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def batch():
    return prompt_batch()


def logits(model, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**enc).logits.float()


@torch.no_grad()
def masked_logits(model, enc) -> torch.Tensor:
    """The logits of the real (unpadded) positions only."""
    return model(**enc).logits.float()[enc["attention_mask"].bool()]


@torch.no_grad()
def greedy_ids(model, enc) -> torch.Tensor:
    return model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=0)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def bf16_baseline(src: Path, enc) -> tuple[torch.Tensor, float]:
    """The float32 upcast's logits and the bfloat16 original's RMS distance from them (> 0)."""
    from transformers import AutoModelForCausalLM

    upcast = masked_logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), enc)
    orig = masked_logits(AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval(), enc)
    base = (orig - upcast).pow(2).mean().sqrt().item()
    assert base > 0
    return upcast, base


def load_shim(out: Path):
    """Import OUT_DIR/precompile_loader.py as a module of its own (not the package)."""
    name = f"precompile_loader_{abs(hash(str(out)))}"
    spec = importlib.util.spec_from_file_location(name, out / "precompile_loader.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# A user's Qwen3 profile, written by hand (tests/test_families_parallel_blocks.py, tests/test_recorded_profile.py).
QWEN3_PROFILE = """
name: qwen3-custom
match: {model_types: [qwen3]}
block: serial
sizes:
  hidden_size: [hidden_size]
  num_heads: [num_attention_heads]
  num_kv_heads: [num_key_value_heads]
  head_dim: [head_dim]
  vocab_size: [vocab_size]
  n_layers: [num_hidden_layers]
embedding: {tensor: model.embed_tokens.weight, module: model.embed_tokens}
attn_norm: {kind: rms, weight: model.layers.0.input_layernorm.weight, eps: [rms_norm_eps],
            module: model.layers.0.input_layernorm}
projections:
  - {role: q, weight: model.layers.0.self_attn.q_proj.weight, module: model.layers.0.self_attn.q_proj}
  - {role: k, weight: model.layers.0.self_attn.k_proj.weight, module: model.layers.0.self_attn.k_proj}
  - {role: v, weight: model.layers.0.self_attn.v_proj.weight, module: model.layers.0.self_attn.v_proj}
qk_norm:
  q: {kind: rms, weight: model.layers.0.self_attn.q_norm.weight, eps: [rms_norm_eps],
      module: model.layers.0.self_attn.q_norm}
  k: {kind: rms, weight: model.layers.0.self_attn.k_norm.weight, eps: [rms_norm_eps],
      module: model.layers.0.self_attn.k_norm}
attention_module: model.layers.0.self_attn
"""
