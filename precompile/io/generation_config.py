"""OUT_DIR's generation_config.json when the source has none.

transformers gives a model loaded without generation_config.json the settings it derives from
config.json (`GenerationConfig.from_model_config`: eos/bos/pad and legacy generation keys, with the
config class's defaults). The converted model is loaded through the shim, which got empty settings
without this file, so greedy decoding ran past the end-of-sequence token.
"""

from __future__ import annotations

from pathlib import Path

from precompile.errors import UserError

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


def check_generation_config(source_root: Path, carried: list[str] | tuple[str, ...]) -> None:
    """The source's generation_config.json, carried into OUT_DIR unchanged, must be one transformers can load
    (`GenerationConfig.from_dict`); refused before any work otherwise. Conversions call it when they import
    transformers anyway (the self-check); its JSON shape and key types are checked while planning
    (source.check_carried_json), which must not import transformers, for every conversion."""
    if GENERATION_CONFIG not in carried:
        return
    import json

    from transformers import GenerationConfig

    path = source_root / GENERATION_CONFIG
    try:
        GenerationConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, it could not load the file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a generation config transformers can load ({first}); fix or "
                        f"re-download it") from None
