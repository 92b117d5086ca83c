"""The original model beside a converted one, and the guards every transformers model build takes.

verify builds the original from transformers' own class with the converted model's parameters aliased
into it (`reference_model`); only the tensors the conversion eliminated are read from the reference
checkpoint (`resolve_reference` finds it). The build helpers are shared with convert's self-check and
bench: `BUILD_LOCK` serialises transformers' imports and model builds across threads (`batch --jobs`),
`parameters_on_meta` builds modules without memory, `quiet_transformers` silences transformers' logging.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from precompile.errors import UserError
from precompile.io.safetensors_files import Checkpoint
from precompile.io.source import Source, resolve_source
from precompile.loader import MANIFEST, Manifest, SourceNotFoundError, locate_source, original_config


# transformers' logging is process-wide: it stays quiet while any thread is inside quiet_transformers(), and the
# last one out restores what it was (threads that saved and restored it each on their own could leave it silenced).
_QUIET = threading.Lock()
_quiet: dict[str, Any] = {"depth": 0}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own loading bars and warnings would bury the report; restore them afterwards."""
    from transformers.utils import logging as tlog

    with _QUIET:
        if _quiet["depth"] == 0:
            _quiet["saved"] = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _QUIET:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                level, bars = _quiet.pop("saved")
                tlog.set_verbosity(level)
                if bars:
                    tlog.enable_progress_bar()


# transformers sets torch's process-wide default dtype while it builds or loads a model (local_torch_dtype), and its
# lazy imports are not thread-safe: the transformers imports and model builds of concurrent threads (`batch --jobs`)
# take turns; what runs the models afterwards does not.
BUILD_LOCK = threading.RLock()
# parameters_on_meta's depth in each thread; torch's parameter-registration hook reads it (registered once: adding
# and removing a hook per build would change torch's hook table while another thread's module iterates over it).
_ON_META = threading.local()
_META_HOOK: list = []
_META_HOOK_LOCK = threading.Lock()


def _parameter_on_meta(_module: nn.Module, _name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    if getattr(_ON_META, "depth", 0) and param is not None and param.device.type != "meta":
        meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        meta._is_hf_initialized = True  # transformers' init_weights skips it (drawing on meta costs seconds)
        return meta
    return None


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no init) and real buffers.

    Only for modules this thread builds inside the block: nn.Module is not patched, and a module that another
    thread builds meanwhile gets real parameters."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    with _META_HOOK_LOCK:
        if not _META_HOOK:
            _META_HOOK.append(register_module_parameter_registration_hook(_parameter_on_meta))
    _ON_META.depth = getattr(_ON_META, "depth", 0) + 1
    try:
        yield
    finally:
        _ON_META.depth -= 1


def reference_model(converted: nn.Module, ref_root: Path, ref_ckpt: Checkpoint, dtype: torch.dtype,
                    device: torch.device) -> nn.Module:
    """The original transformers model, sharing every parameter the converted model holds under the same
    name and shape; the rest (the eliminated tensors) is read from the reference checkpoint."""
    with BUILD_LOCK:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(ref_root))
        base = AutoModelForCausalLM._model_mapping[type(config)]
        attn = getattr(converted.config, "_attn_implementation", None)
        with parameters_on_meta():
            ref = base._from_config(config, dtype=dtype, attn_implementation=attn)
    conv = dict(converted.named_parameters(remove_duplicate=False))
    loaded: dict[int, nn.Parameter] = {}
    for mod_name, module in ref.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            c = conv.get(full)
            if c is not None and tuple(c.shape) == tuple(p.shape):
                module._parameters[pname] = c
                continue
            if id(p) not in loaded:
                if full not in ref_ckpt.tensors:
                    raise RuntimeError(f"cannot build the reference: parameter {full} is neither in the converted "
                                       f"model nor in {ref_root}")
                t = ref_ckpt.get(full).to(device=device, dtype=dtype)
                loaded[id(p)] = nn.Parameter(t, requires_grad=False)
            module._parameters[pname] = loaded[id(p)]
        for bname, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[bname] = b.to(device)
    ref.generation_config = converted.generation_config
    return ref.eval()


def load_tokenizer(out: Path, manifest: Manifest) -> Any:
    """OUT_DIR's tokenizer, left-padded with a pad token (a batch of prompts of different lengths)."""
    with BUILD_LOCK:
        from transformers import AutoTokenizer

        # the original config, so that OUT_DIR's config.json (custom code) is never consulted
        tok = AutoTokenizer.from_pretrained(str(out), config=original_config(manifest))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def resolve_reference(manifest: Manifest, reference: str | None) -> Source:
    """The original checkpoint: --reference, else the source recorded at conversion (`locate_source`)."""
    if reference is not None:
        try:
            return resolve_source(reference)
        except UserError as e:
            raise UserError(f"reference not found: {e}") from None
    src = manifest.source
    hub: list[Source] = []

    def snapshot(repo: str, revision: str | None) -> Path:
        hub.append(resolve_source(repo, revision))
        return hub[0].root

    try:
        root = locate_source(manifest, hub=snapshot)
    except SourceNotFoundError:
        if src.path:
            raise UserError(f"the source recorded in {MANIFEST} ({src.path}) no longer exists; pass --reference "
                            f"with the original checkpoint (directory or hub id)") from None
        raise UserError(f"{MANIFEST} records no source; pass --reference with the original checkpoint") from None
    except UserError as e:
        raise UserError(f"reference not found: {e}; or pass --reference") from None
    return hub[0] if hub else resolve_source(str(root))
