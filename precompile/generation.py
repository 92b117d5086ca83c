"""OUT_DIR's generation_config.json when the source has none.

transformers gives a model loaded without generation_config.json the settings it derives from
config.json (`GenerationConfig.from_model_config`: eos/bos/pad and legacy generation keys, with the
config class's defaults). The converted model is loaded through the shim, which got empty settings
without this file, so greedy decoding ran past the end-of-sequence token.
"""

from __future__ import annotations

from pathlib import Path

GENERATION_CONFIG = "generation_config.json"


def write_generation_config(source_root: Path, carried: list[str] | tuple[str, ...], out: Path) -> bool:
    """Write what transformers derives for the original into out/generation_config.json, unless the
    source's own file is carried over; True when written. Imports transformers only in that case."""
    if GENERATION_CONFIG in carried:
        return False
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(str(source_root))
    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    return True
