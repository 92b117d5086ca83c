"""A profile against the checkpoint it is used on: every tensor it names exists, with the shape its sizes give.

Mistakes here are a profile author's (a misspelt tensor name, a size read from the wrong config.json
key) as often as a checkpoint's, so each failure is one line naming the profile file, the key, the
tensor and the fix, with the checkpoint's nearest tensor names when the name is wrong.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from precompile.errors import UserError
from precompile.io.safetensors_files import TensorInfo
from precompile.plan.table_layout import projection_width, table_inputs
from precompile.profiles.model_spec import ModelSpec
from precompile.profiles.profile_resolution import Profile, effective_definition
from precompile.profiles.sections import ProfileDef
from precompile.profiles.yaml_schema import tagged


def _key_of(keys: list[tuple[str, str]], name: str) -> str:
    for where, template in keys:  # a template holds an index such as {e} (expert) or {h} (head)
        if template == name or re.fullmatch(re.sub(r"\\\{\w+\\\}", r"\\d+", re.escape(template)), name):
            return where
    return "?"


def _size_source(body: ProfileDef, config: dict, name: str, value: int) -> str:
    """'sizes.num_kv_heads = 2 (config.json num_key_value_heads)': where a resolved size came from."""
    spec = getattr(body.sizes, name)
    keys = spec.keys if spec is not None else ()
    key = next((k for k in keys if config.get(k) is not None), None)
    origin = f"config.json {key}" if key else "the profile's number" if spec is not None and not keys else \
        "the default" if spec is None else f"the default for absent {'/'.join(keys)}"
    return f"sizes.{name} = {value} ({origin})"


_SIZES_OF_ROLE = {"q": ("num_heads", "head_dim"), "k": ("num_kv_heads", "head_dim"), "v": ("num_kv_heads", "head_dim"),
                  "qkv": ("num_heads", "num_kv_heads", "head_dim")}


def check_tensors(profile: Profile, config: dict, spec: ModelSpec, tensors: dict[str, TensorInfo], root: Path) -> None:
    """Every tensor the profile needs for this config exists in `tensors`, and the shapes its sizes give hold."""
    body = effective_definition(profile, config)
    keys = list(tagged(body, "tensor"))  # (key path, tensor name or a template with an index such as {e})
    present = frozenset(tensors)
    needed = [*table_inputs(spec, present),
              *(p.bias for p in spec.projections if p.bias_required)]
    required_biases = {p.bias for p in spec.projections if p.bias_required}
    for name in needed:
        if name in required_biases and name not in present:
            raise UserError(f"profile {profile.path}: key '{_key_of(keys, name)}' names bias {name}, which bias_when "
                            f"makes required, but the checkpoint in {root} has no such tensor; drop bias_when (a "
                            f"bias the checkpoint lacks is then skipped) or set it to the config.json key that says "
                            f"whether the model has biases")
        if name not in present:
            near = difflib.get_close_matches(name, sorted(present), n=2, cutoff=0.75)
            hint = f" (nearest: {', '.join(near)})" if near else ""
            raise UserError(f"profile {profile.path}: key '{_key_of(keys, name)}' names tensor {name}, which is "
                            f"missing from the checkpoint in {root}{hint}; fix the name in the profile, or complete "
                            f"the checkpoint")
    sizes = {"hidden_size": spec.hidden_size, "vocab_size": spec.vocab_size, "num_heads": spec.num_heads,
             "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim}
    expect = [(spec.embedding_tensor, (spec.vocab_size, spec.hidden_size), ("vocab_size", "hidden_size"))]
    for p in spec.projections:
        if p.width is not None or p.low_rank is not None:
            continue  # sizes of their own (width, low_rank.rank, out_norm.width): convert's _validate names them
        w = projection_width(spec, p.role)
        expect.append((p.weight, (w, spec.hidden_size), (*_SIZES_OF_ROLE[p.role], "hidden_size")))
        if p.bias in present:
            expect.append((p.bias, (w,), _SIZES_OF_ROLE[p.role]))
    norms = [spec.embedding_norm, spec.attn_norm, spec.ffn.norm if spec.folds_ffn and spec.ffn else None]
    expect += [(t, (spec.hidden_size,), ("hidden_size",)) for n in norms if n for t in (n.weight, n.bias) if t]
    for name, shape, used in expect:
        got = tuple(tensors[name].shape)
        if got != shape:
            how = ", ".join(_size_source(body, config, s, sizes[s]) for s in used)
            raise UserError(f"profile {profile.path}: tensor {name} ('{_key_of(keys, name)}') has shape {list(got)} "
                            f"in {root}, but config.json implies {list(shape)} through the profile's sizes ({how}); "
                            f"fix those sizes keys of the profile, or config.json where it does not match the weights")
