"""Resolve SOURCE (a hub repo id or a local directory) to files on disk, and read its config.

Hub ids go through huggingface_hub's snapshot_download, fetching config, tokenizer
and generation files first, then only the safetensors files the index names;
HF_HOME, HF_HUB_OFFLINE and HF_TOKEN are honoured by huggingface_hub itself. An overlay fetches less: the small files
first, then (`fetch_files`) only the shards that hold the tensors layer 0 needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from precompile.errors import UserError
from precompile.io.file_safety import check_inside, check_regular, read_json
from precompile.io.hub import bound_hub_requests, hub_errors
from precompile.io.weight_file_names import INDEX_NAME, SINGLE_NAME, weight_index

ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt",
                  "spiece.model", "*.jinja", "README.md"]  # README.md: the source card's license/language
# Files carried into OUT_DIR unchanged: the tokenizer and generation files transformers reads (config.json is
# rewritten). An allowlist of exact names (and `*.tiktoken`), all data: nothing Python could import from OUT_DIR
# (no `.py`, `.pyc`, `.so`, no package directory) and no other file of the checkpoint is ever carried.
CARRIED_NAMES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                           "generation_config.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                           "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
                           "preprocessor_config.json"})
CARRIED = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.tiktoken$")  # tiktoken vocabularies (Qwen's qwen.tiktoken)
SOURCE_CARD = "README.md"  # read for the card's license and language, never carried
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Source:
    root: Path  # directory with config.json and the weights
    id: str | None  # hub repo id, or None for a local directory
    revision: str | None  # exact commit for hub sources
    path: str | None  # absolute local path for local sources

    def describe(self) -> dict:
        if self.id is not None:
            return {"id": self.id, "revision": self.revision}
        return {"path": self.path}


def is_hub_id(source: str) -> bool:
    """A well-formed hub repo id (as huggingface_hub itself validates it) that is not a local path."""
    if not _HUB_ID.match(source) or Path(source).exists():
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def resolve_source(source: str, revision: str | None = None, allow_patterns: list[str] | None = None,
                   weights: bool = True) -> Source:
    """Find SOURCE on disk, downloading a hub snapshot when it is a repo id.

    weights=False fetches no *.safetensors file (an overlay fetches the few it needs with `fetch_files`).
    """
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"SOURCE {source} is a file; pass the checkpoint directory (with config.json)")
        if revision is not None:
            raise UserError(f"--revision applies to hub ids, but SOURCE {source} is a local directory; drop it")
        return Source(root=p.resolve(), id=None, revision=None, path=str(p.resolve()))
    if not is_hub_id(source):
        raise UserError(f"SOURCE {source} not found: no such directory, and it is not a hub repo id (org/name)")
    patterns = [p for p in allow_patterns or ALLOW_PATTERNS if not p.endswith(".safetensors")]
    src = _download(source, revision, patterns)
    if weights:
        _fetch_weights(src)
    return src


def _fetch_weights(src: Source) -> None:
    """The safetensors files the index names (or model.safetensors without one), at the revision already
    resolved: never every `*.safetensors` of the repo (Mistral's repos also ship a consolidated.safetensors
    of the whole model). A file the repo lacks is left for `checkpoint_files` to name."""
    from precompile.io.safetensors_files import read_index

    index = weight_index(src.root)
    if index is not None:
        names = sorted(set(read_index(index).values()))
    else:
        names = [SINGLE_NAME]
    missing = [n for n in names if not (src.root / n).exists()]
    if missing:
        _download(src.id, src.revision, missing)


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Source:
    from huggingface_hub import snapshot_download

    bound_hub_requests()
    with hub_errors("download", repo_id, revision):
        root = Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    return Source(root=root, id=repo_id, revision=root.name, path=None)


def fetch_files(src: Source, names: list[str]) -> None:
    """Make sure the named files of SOURCE are on disk: downloaded one by one for a hub id (at the exact
    revision already resolved), present for a local directory."""
    for name in names:
        if (src.root / name).exists():
            continue
        if src.id is None:
            raise UserError(f"{src.root / name} is missing; the checkpoint is incomplete, restore the file")
        from huggingface_hub import hf_hub_download

        bound_hub_requests()
        with hub_errors("download", src.id, src.revision, name):
            got = Path(hf_hub_download(src.id, name, revision=src.revision))
        if got.parent != src.root:
            raise UserError(f"{src.id}: {name} was fetched into {got.parent}, not the snapshot {src.root}; the HF "
                            f"cache moved during the run, run again")


def weight_map(src: Source) -> dict[str, str]:
    """Tensor name -> file, from the index (or the header of a single model.safetensors), reading no tensor."""
    from precompile.io.safetensors_files import read_header, read_index

    index = weight_index(src.root)
    if index is not None:
        return read_index(index)
    fetch_files(src, [SINGLE_NAME])
    infos, _ = read_header(src.root / SINGLE_NAME)
    return {name: SINGLE_NAME for name in infos}


def read_config(root: Path) -> dict:
    """config.json as a dict, refusing checkpoints whose weights the trick cannot read."""
    p = source_file(root, "config.json", "config.json")
    try:
        config = read_json(p)
    except FileNotFoundError:
        raise UserError(f"{root} has no config.json; SOURCE must be a Hugging Face model directory") from None
    if not isinstance(config, dict):
        raise UserError(f"{p} is not a JSON object; fix or re-download it")
    q = config.get("quantization_config")
    if q:
        method = q.get("quant_method", "unknown") if isinstance(q, dict) else "unknown"
        raise UserError(f"{p} has a quantization_config ({method}): its weights are packed and would give a "
                        f"garbage table; convert the unquantized model instead")
    return config


def is_carried(name: str) -> bool:
    """A file name that goes into OUT_DIR unchanged (see CARRIED_NAMES)."""
    return name in CARRIED_NAMES or bool(CARRIED.match(name))


def source_file(root: Path, name: str, what: str) -> Path:
    """root/name, a file of SOURCE this tool reads: it must stay inside SOURCE (after resolving symlinks; a hub
    cache's blobs count as inside) and be a regular file (a FIFO would block, a device never end). A missing
    file is left to the caller."""
    check_inside(root, name, what)
    p = root / name
    check_regular(p, f"{what} ")
    return p


def carried_files(root: Path) -> list[str]:
    """Tokenizer and generation files that go into OUT_DIR unchanged: the allowlisted names only (never code:
    a `.py`, `.pyc` or `.so` in OUT_DIR could be imported from it), each a regular file inside SOURCE, and each
    JSON one of the shape transformers reads (`check_carried_json`)."""
    names = []
    for p in sorted(root.iterdir()):
        if not is_carried(p.name):
            continue
        source_file(root, p.name, "tokenizer/generation file")
        if p.suffix == ".json":
            check_carried_json(p)
        names.append(p.name)
    return names


# Every carried JSON file is an object to transformers; these keys must also have these types where present.
_JSON_KEY_TYPES: dict[str, dict[str, tuple[type, ...]]] = {"chat_template.json": {"chat_template": (str, list)}}


def check_carried_json(path: Path) -> None:
    """A carried JSON file must be what transformers reads there: an object (a generation_config.json that is an
    array or a string would make `GenerationConfig.from_pretrained`, verify and load fail later), with no
    auto_map to code in another repo. (generation.check_generation_config asks transformers itself, where
    a conversion imports it anyway.)"""
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} is a JSON {_json_kind(data)}, not the JSON object transformers reads; fix or "
                        f"re-download it")
    remote = [v for v in _strings(data.get("auto_map")) if "--" in v]
    if remote:
        raise UserError(f"{path}: auto_map names code in another repo ({remote[0]!r}), which trust_remote_code "
                        f"would download and run when OUT_DIR is loaded; remove the auto_map entry")
    for key, types in _JSON_KEY_TYPES.get(path.name, {}).items():
        if key in data and not isinstance(data[key], types):
            raise UserError(f"{path}: key {key!r} is a JSON {_json_kind(data[key])}, not what transformers reads; "
                            f"fix or re-download it")


def _strings(v: object) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):
        v = list(v.values())
    return [s for x in v for s in _strings(x)] if isinstance(v, list) else []


def check_source_files(root: Path) -> None:
    """The files of SOURCE read outside the index's weight files and the carried files (checked where they are
    read): the index itself, a single model.safetensors and the source's model card must each be a regular
    file inside SOURCE, checked before any work."""
    for name, what in ((INDEX_NAME, "weight index"), (SINGLE_NAME, "weight file"), (SOURCE_CARD, "model card")):
        source_file(root, name, what)


def _json_kind(v: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def check_native(config: dict, root: Path, native_types: Collection[str] = ()) -> None:
    """Refuse what only runs with trust_remote_code: this tool never runs code shipped with a checkpoint.

    The loader builds the model from transformers' own class for `model_type`; an auto_map whose
    architectures all have native classes is ignored (older repos kept one after upstreaming).
    A model type in `native_types` (the shipped profiles': native in every transformers release this
    package accepts, as tests/plan/test_plan.py checks) without an auto_map needs no look into
    transformers, whose import would slow every conversion.
    """
    p = root / "config.json"
    model_type = config.get("model_type")
    if model_type == "precompiled" or isinstance(config.get("precompile"), dict) or (root / "precompile.json").exists():
        raise UserError(f"{root} is already a precompiled model (see its precompile.json); convert the original "
                        f"checkpoint instead")
    if isinstance(model_type, str) and model_type in native_types and not config.get("auto_map"):
        return
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    remote = " and an auto_map to code shipped in the checkpoint" if config.get("auto_map") else ""
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        archs = config.get("architectures") or []
        arch = f" ({archs[0]})" if archs and isinstance(archs[0], str) else ""
        raise UserError(f"{p}: model type {model_type!r}{arch} has no native transformers class{remote}; it needs "
                        f"trust_remote_code, which this tool never uses: convert a natively supported model")
    if config.get("auto_map"):
        archs = config.get("architectures") or []
        foreign = [a for a in archs if not (isinstance(a, str) and hasattr(transformers, a))]
        if foreign or not archs:
            name = foreign[0] if foreign else "(none listed)"
            raise UserError(f"{p}: architecture {name} is defined by code shipped in the checkpoint (auto_map), "
                            f"not by transformers; this tool never runs checkpoint code (trust_remote_code)")


def check_tokenizer(root: Path, vocab_rows: int) -> None:
    """Every token id the tokenizer files can produce must have an embedding row (mergekit #428, #548)."""
    found: list[tuple[int, str, str]] = []  # (id, token, file)

    def read(name: str):
        p = root / name
        if not p.exists():
            return None
        return read_json(p)

    def add(i, token, name: str) -> None:
        if isinstance(i, int) and not isinstance(i, bool):
            found.append((i, str(token), name))
        elif isinstance(i, str) and i.isdigit():
            found.append((int(i), str(token), name))

    tj = read("tokenizer.json")
    if tj is not None:
        _check_tokenizer_json(root / "tokenizer.json", tj)
    name = "tokenizer.json"
    try:
        if isinstance(tj, dict):
            vocab = (tj.get("model") or {}).get("vocab") if isinstance(tj.get("model"), dict) else None
            if isinstance(vocab, dict):
                for tok, i in vocab.items():
                    add(i, tok, "tokenizer.json")
            elif isinstance(vocab, list) and vocab:  # Unigram: [[piece, score], ...], ids by position
                add(len(vocab) - 1, vocab[-1][0] if isinstance(vocab[-1], list) else vocab[-1], "tokenizer.json")
            for t in tj.get("added_tokens") or []:
                if isinstance(t, dict):
                    add(t.get("id"), t.get("content"), "tokenizer.json")
        name = "added_tokens.json"
        added = read(name)
        if isinstance(added, dict):
            for tok, i in added.items():
                add(i, tok, name)
        name = "tokenizer_config.json"
        tc = read(name)
        if isinstance(tc, dict) and isinstance(tc.get("added_tokens_decoder"), dict):
            for i, t in tc["added_tokens_decoder"].items():
                add(i, t.get("content") if isinstance(t, dict) else t, name)
    except (TypeError, IndexError, AttributeError, KeyError) as e:
        raise UserError(f"{root / name} has entries of the wrong type ({type(e).__name__}: {e}); it is not a valid "
                        f"tokenizer file, fix or re-download it") from None
    if not found:
        return
    top = max(found)
    if top[0] >= vocab_rows:
        raise UserError(f"{root / top[2]}: token {top[1]!r} has id {top[0]}, but the embedding has {vocab_rows} "
                        f"rows (ids 0-{vocab_rows - 1}); the tokenizer does not match the weights, fix it")


def _check_tokenizer_json(path: Path, data: object) -> None:
    """tokenizer.json must be a tokenizer that the `tokenizers` library (what transformers uses) can build."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"{path} is JSON but not a tokenizer (no 'model' object); fix or re-download it")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # noqa: BLE001 - whatever the Rust parser calls it, the file is not a tokenizer
        raise UserError(f"{path} is not a valid tokenizer ({str(e).splitlines()[0][:200] if str(e) else e!r}); fix "
                        f"or re-download it") from None
