"""The names of a checkpoint's weight files, as transformers writes them.

Torch-free, so that `plan` on a config.json or a directory without weights, which only asks
whether weights are there, imports neither torch nor safetensors.
"""

from __future__ import annotations

from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def has_safetensors(root: Path) -> bool:
    return (root / SINGLE_NAME).exists() or (root / INDEX_NAME).exists()


def weight_index(root: Path) -> Path | None:
    """The index mapping each tensor to its file, or None when the checkpoint is one model.safetensors
    (which wins when both are present, as transformers loads it)."""
    index = root / INDEX_NAME
    return index if index.exists() and not (root / SINGLE_NAME).exists() else None
