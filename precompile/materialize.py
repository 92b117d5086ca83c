"""`materialize`: turn an overlay into a full conversion, byte for byte what `convert` would write.

The base is resolved and fully checked as the loader does, then converted with the
overlay's recorded options, copying the overlay's table instead of recomputing it: a
table computed with another chunk size, device or CPU may differ in its last bits (within
the rounding bound), so only the copy gives the bytes `convert` wrote on the machine that
made the overlay. The result is self-checked like any conversion.
"""

from __future__ import annotations

import os
from pathlib import Path

from precompile.convert import ConvertResult, convert
from precompile.errors import UserError
from precompile.io.hashed_copy import file_sha256
from precompile.io.generation_config import check_generation_config
from precompile.io.progress import Progress
from precompile.loader import MANIFEST, Manifest, overlay_base
from precompile.plan.conversion_plan import plan_conversion
from precompile.plan.convert_options import ConvertOptions
from precompile.plan.table_layout import TABLE_FILE
from precompile.profiles.catalog import load_profile, recorded_profile


def materialize(overlay_dir: str | os.PathLike, full_dir: str | os.PathLike, *, base: str | os.PathLike | None = None,
                profile: str | None = None, force: bool = False, link: str = "auto",
                progress: Progress | None = None, self_check: bool = True) -> ConvertResult:
    """Write FULL_DIR: the overlay's base without the eliminated tensors, plus the overlay's table."""
    progress = progress or Progress(quiet=True)
    overlay_dir = Path(overlay_dir)
    manifest = Manifest.read(overlay_dir)
    if manifest.kind != "overlay":
        raise UserError(f"{overlay_dir} is already a full conversion; copy it instead of materializing it")
    table = overlay_dir / TABLE_FILE
    if file_sha256(table) != manifest.outputs.get(TABLE_FILE):
        raise UserError(f"{table} differs from the sha256 in its manifest; the overlay is damaged, convert again")
    progress.log("checking the base against the overlay's manifest")
    root = overlay_base(overlay_dir, base, full=True, manifest=manifest)
    src = manifest.source
    hub = base is None and src.id
    # the profile the overlay was made with (recorded in its manifest) needs no --profile
    prof = load_profile(profile) if profile is not None else recorded_profile(manifest, str(overlay_dir / MANIFEST))
    opts = ConvertOptions.from_record(manifest.options, revision=src.revision if hub else None, profile=prof,
                                      device="cpu", link=link, self_check=self_check)
    source = src.id if hub else str(root)
    plan = plan_conversion(source, **opts.compared())
    if self_check:  # as convert: only where transformers is imported anyway
        check_generation_config(plan.source.root, plan.carried)
    if plan.profile.name != manifest.profile.name:
        raise UserError(f"the base reads as profile {plan.profile.name}, but the overlay was made with "
                        f"{manifest.profile.name}; pass --profile with the overlay's profile")
    return convert(source, full_dir, opts, force=force, progress=progress, table=table)
