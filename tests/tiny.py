"""Tiny random checkpoints built with transformers itself, laid out as on the hub.

Weights are drawn with std 0.15 (norm weights around their identity) so that greedy
decoding has clear winners and every folded parameter matters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 203  # not a multiple of any chunk size the tests use
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a converted model must give the same outputs as the original",
    "precompute the first layer once for every token in the vocabulary",
    "hello world, this is a tiny tokenizer for tests",
    "rotary position embeddings enter only inside attention",
]
PROMPTS = ["the quick brown fox", "hello world", "a converted model must", "precompute the first layer of"]

_COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
               vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False, **_COMMON),
    "llama_tied": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                       **_COMMON),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None,
                    **_COMMON),
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, tie_word_embeddings=False, num_local_experts=4,
                    num_experts_per_tok=2, **_COMMON),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=False, **_COMMON),
    "gemma": dict(model_type="gemma", num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, **_COMMON),
}


def make_config(family: str, **overrides):
    kw = dict(FAMILIES[family])
    kw.update(overrides)
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Large random weights; norm weights near their identity (1, or 0 for Gemma's 1 + w)."""
    g = torch.Generator().manual_seed(seed)
    offset_norm = model.config.model_type in ("gemma",)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.15
            if "norm" in name and p.dim() == 1 and name.endswith("weight"):
                p.copy_(noise + (0.0 if offset_norm else 1.0))
            else:
                p.copy_(noise)


def build_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **overrides))
    randomize(model, seed)
    return model.eval()


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")
    return fast


def save_checkpoint(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32,
                    shard_kb: int | None = 40) -> Path:
    """save_pretrained in `dtype`, sharded (small max_shard_size) unless shard_kb is None, plus a tokenizer."""
    path = Path(path)
    m = model.to(dtype)
    kw = {"max_shard_size": f"{shard_kb}KB"} if shard_kb else {"max_shard_size": "1GB"}
    m.save_pretrained(path, **kw)
    make_tokenizer().save_pretrained(path)
    model.to(torch.float32)
    return path


def lay_out_hub_cache(hf_home: Path, repo_id: str, src: Path, revision: str = "0" * 40) -> Path:
    """Place a checkpoint into HF_HOME as huggingface_hub's cache does (blobs, snapshot symlinks, refs)."""
    import hashlib

    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for f in sorted(Path(src).iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snap


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst
