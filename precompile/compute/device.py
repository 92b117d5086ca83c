"""`--device auto|cpu|cuda` as a torch device: one rule for every command that computes (convert, verify, bench)."""

from __future__ import annotations

import torch

from precompile.errors import UserError


def pick_device(device: str) -> torch.device:
    """auto is CUDA when torch sees one, else the CPU; cuda without a CUDA device is refused, not replaced."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device} is not one of auto, cpu, cuda")
    return torch.device(device)
