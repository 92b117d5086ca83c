"""precompile: precompute the token-only part of layer 0 of a causal LM (arXiv 2402.13388).

Library API (the CLI is a thin layer over it):
- `convert(source, out_dir, ...)`: write a precompiled checkpoint.
- `plan_conversion(source, ...)`: what a conversion would read, eliminate and write.
- `load(out_dir, device=None, dtype=None, base=None)`: the converted model as a transformers model
  (an overlay is laid over its base: the recorded source, or `base`).
- `verify(out_dir, ...)`: check a converted model against its original; returns the report.
- `materialize(overlay_dir, full_dir)`: an overlay turned into a full conversion.
"""

__version__ = "0.1.0"

# Imported on first use: `precompile --help`, `plan` and `profiles` need neither torch's models nor
# transformers, which take seconds to import.
_API = {
    "convert": "convert", "plan_conversion": "convert", "ConversionPlan": "convert", "ConvertResult": "convert",
    "UserError": "errors", "VerificationError": "errors", "load": "loader", "PrecompileLoadError": "loader",
    "materialize": "materialize", "verify": "verify",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'precompile' has no attribute {name!r}")
