"""precompile: precompute the token-only part of layer 0 of a causal LM (arXiv 2402.13388).

Library API (the CLI is a thin layer over it):
- `convert(source, out_dir, ...)`: write a precompiled checkpoint; its options are `ConvertOptions` fields.
- `plan_conversion(source, ...)`: what a conversion would read, eliminate and write.
- `plan_model(source, ...)`: `precompile plan`'s figures: what precomputing layer 0 buys the model.
- `load(out_dir, device=None, dtype=None, base=None)`: the converted model as a transformers model
  (an overlay is laid over its base: the recorded source, or `base`).
- `verify(out_dir, ...)`: check a converted model against its original; returns the report; its options
  are `VerifyOptions` fields.
- `materialize(overlay_dir, full_dir)`: an overlay turned into a full conversion.
"""

import sys
import types

from precompile.version import __version__

__all__ = ["convert", "plan_conversion", "plan_model", "load", "verify", "materialize", "ConversionPlan",
           "ConvertOptions", "VerifyOptions", "ConvertResult", "UserError", "VerificationError", "PrecompileLoadError",
           "__version__"]

# Where each public name lives. They are imported on first use (PEP 562), so that `import precompile.cli`
# (every command's start) costs no torch import before the CLI has installed its signal handling.
_HOME = {"convert": "convert", "plan_conversion": "plan.conversion_plan", "ConversionPlan": "plan.conversion_plan",
         "plan_model": "plan.plan_report",
         "ConvertResult": "convert", "ConvertOptions": "plan.convert_options", "UserError": "errors",
         "VerificationError": "errors", "load": "loader", "PrecompileLoadError": "loader",
         "materialize": "materialize", "verify": "check.verify", "VerifyOptions": "check.verify_options"}


class _Package(types.ModuleType):
    """Keeps `precompile.convert`, `.verify` and `.materialize` the functions, as an eager import did: the
    import system binds a submodule to its package's attribute when it is first imported."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _HOME.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _HOME:
        import importlib

        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
