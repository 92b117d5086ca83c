"""No process-wide side effects: verify and the self-check build models with parameters on the meta device
without patching nn.Module (threads of `batch --jobs` build their own models meanwhile), transformers'
logging is restored however threads overlap, and bench's warnings filter ends with bench."""

from __future__ import annotations

import threading
import warnings

import torch
from torch import nn
from transformers.utils import logging as tlog

from precompile import convert, verify
from precompile.check.bench import bench
from precompile.check.reference_model import parameters_on_meta, quiet_transformers


def _module_attributes() -> dict[str, object]:
    return dict(vars(nn.Module))


def test_parameters_on_meta_acts_in_its_own_thread_only():
    """A module built by another thread while one thread is inside parameters_on_meta() gets real parameters,
    and nn.Module itself is never changed."""
    before = _module_attributes()
    inside, built = threading.Event(), threading.Event()
    got: dict[str, nn.Module] = {}

    def build_on_meta() -> None:
        with parameters_on_meta():
            inside.set()
            built.wait(30)
            got["meta"] = nn.Linear(3, 4)
            got["meta_buffers"] = nn.BatchNorm1d(3)

    t = threading.Thread(target=build_on_meta)
    t.start()
    try:
        assert inside.wait(30)
        patched = _module_attributes() != before  # nothing patched while the block is open
        got["other"] = nn.Linear(3, 4)
    finally:
        built.set()
        t.join(30)
    assert not patched
    assert got["other"].weight.device.type == "cpu" and got["other"].weight.abs().sum() > 0
    assert got["meta"].weight.is_meta and got["meta"].bias.is_meta
    assert got["meta_buffers"].weight.is_meta and got["meta_buffers"].running_var.device.type == "cpu"
    assert _module_attributes() == before
    assert nn.Linear(3, 4).weight.device.type == "cpu"  # and in that thread, after the block


def test_quiet_transformers_restores_logging_when_threads_overlap():
    """A enters, B enters, A leaves, B leaves: logging stays quiet until the last one leaves, then is as before."""
    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    during: list[int] = []

    def a() -> None:
        with quiet_transformers():
            a_in.set()
            b_in.wait(30)
        a_out.set()

    def b() -> None:
        a_in.wait(30)
        with quiet_transformers():
            b_in.set()
            a_out.wait(30)
            during.append(tlog.get_verbosity())

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert during == [tlog.ERROR]
    assert (tlog.get_verbosity(), tlog.is_progress_bar_enabled()) == (level, bars)


def test_verify_leaves_nn_module_and_logging_as_they_were(checkpoint, tmp_path):
    src = checkpoint("llama")
    out = tmp_path / "out"
    convert(str(src), out, device="cpu")
    before = (_module_attributes(), tlog.get_verbosity(), tlog.is_progress_bar_enabled(), torch.get_default_dtype())
    r = verify(out, max_new_tokens=2, rows=8)
    assert r["passed"]
    assert (_module_attributes(), tlog.get_verbosity(), tlog.is_progress_bar_enabled(),
            torch.get_default_dtype()) == before


def test_bench_leaves_the_warnings_filters_as_they_were(checkpoint, tmp_path):
    src = checkpoint("llama")
    out = tmp_path / "out"
    convert(str(src), out, device="cpu")
    with warnings.catch_warnings():  # the test itself leaves the process's filters alone
        before = list(warnings.filters)
        bench(out, str(src), device="cpu", batches=(1,), prompt_len=4, decode_tokens=2, reps=1, max_reps=1)
        assert warnings.filters == before
