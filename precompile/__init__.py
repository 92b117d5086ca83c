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

from .convert import ConversionPlan, ConvertResult, convert, plan_conversion  # noqa: E402
from .errors import UserError, VerificationError  # noqa: E402
from .loader import PrecompileLoadError, load  # noqa: E402
from .materialize import materialize  # noqa: E402
from .verify import verify  # noqa: E402

__all__ = ["convert", "plan_conversion", "load", "verify", "materialize", "ConversionPlan", "ConvertResult",
           "UserError", "VerificationError", "PrecompileLoadError", "__version__"]
