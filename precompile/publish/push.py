"""`push`: upload a converted OUT_DIR to the Hugging Face hub, after checking every hash in its manifest.

Only the files the manifest records (plus the manifest) are uploaded, in one commit with
`HfApi.upload_folder`: the hub revision then shows either the previous state or the whole
model, never half of it, which is what OUT_DIR's own atomic write promises locally. Hence no
`upload_large_folder` at any size: its many commits would give up that property, and not every
huggingface_hub this project supports has it (2.4 has none); upload_folder uploads large files itself.
HF_TOKEN, HF_ENDPOINT and the login in HF_HOME are huggingface_hub's own business; its
failures become one-line `UserError`s that say what to do (`precompile.io.hub`'s table, for uploads).
"""

from __future__ import annotations

import glob
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from precompile.errors import UserError
from precompile.io.hub import NO_TOKEN, bound_hub_requests, hub_errors, with_retries
from precompile.io.out_dir import OutDir
from precompile.io.progress import Progress
from precompile.loader import MANIFEST
from precompile.version import __version__

PUBLIC_HUB = "huggingface.co"
# Weight files already in the repo that this OUT_DIR does not hold are deleted in the same commit: a revision
# never mixes two conversions' shards (the repo's other files, e.g. images a user added, stay).
STALE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]


@dataclass(frozen=True)
class PushPlan:
    """What `push` uploads: checked before anything leaves the machine."""

    out_dir: Path
    repo_id: str
    revision: str  # the branch the commit goes to
    private: bool
    commit_message: str
    files: tuple[tuple[str, int], ...]  # (name, bytes), the manifest last
    left_out: tuple[str, ...]  # files in OUT_DIR that the manifest does not record

    def describe(self) -> str:
        lines = [f"repo: {self.repo_id} (model{', private if created' if self.private else ''})",
                 f"revision: {self.revision}",
                 f"files ({len(self.files)}, {sum(s for _, s in self.files):,} bytes):"]
        lines += [f"  {name}  {size:,} bytes" for name, size in self.files]
        if self.left_out:
            lines.append(f"not uploaded (not recorded in {MANIFEST}): {', '.join(self.left_out)}")
        return "\n".join(lines)


def local_overlay_reason(where: str) -> str:
    return (f"{where} is an overlay of a local directory: from_pretrained on the hub could not find its base; "
            f"convert the overlay from the base's hub id, or push a full conversion (precompile materialize)")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"REPO_ID {repo_id!r} is not a valid hub repo id ({str(e).splitlines()[0]}); "
                        f"pass namespace/name") from None


def check_token() -> None:
    """The public hub takes no anonymous writes: refuse before anything is converted or uploaded.

    Another HF_ENDPOINT (a private hub mirror) may not need a token; its own 401 is mapped later.
    """
    from huggingface_hub import constants, get_token

    if urlsplit(constants.ENDPOINT).hostname == PUBLIC_HUB and not get_token():
        raise UserError(NO_TOKEN)


def check_target(repo_id: str) -> None:
    """Everything about the destination that can be checked without the network."""
    check_repo_id(repo_id)
    check_token()


def check_push_source(repo_id: str, source: str, overlay: bool) -> None:
    """`convert --push-to-hub`: refuse what push would refuse, before the conversion runs."""
    from precompile.io.source import is_hub_id

    check_target(repo_id)
    if overlay and not is_hub_id(source):
        raise UserError(local_overlay_reason(f"--overlay of {source}"))


def plan_push(out_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
              commit_message: str | None = None) -> PushPlan:
    """Check OUT_DIR (manifest, every recorded sha256, overlay base on the hub) and list what would be uploaded."""
    from precompile.check.file_checks import check_outputs, read_out_dir

    check_repo_id(repo_id)
    out, manifest = read_out_dir(out_dir)
    integrity = check_outputs(out, manifest)
    if not integrity.passed:
        m = integrity.metrics
        bad = "; ".join(f"{what}: {', '.join(m[what])}" for what in ("changed", "missing") if m[what]) \
            or "no output hashes recorded"
        raise UserError(f"{out} does not match its {MANIFEST} ({bad}); it is damaged or half-written, convert "
                        f"again before pushing")
    src = manifest.source
    if manifest.kind == "overlay" and not src.id:
        raise UserError(local_overlay_reason(str(out)))
    names = sorted(manifest.outputs) + [MANIFEST]
    label = src.id or Path(str(src.path or out)).name
    return PushPlan(out, repo_id, revision or "main", private,
                    commit_message or f"Upload {label} with layer 0 precomputed (precompile {__version__})",
                    tuple((n, (out / n).stat().st_size) for n in names),
                    tuple(integrity.metrics["unrecorded"]))


def push(out_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False, progress: Progress | None = None) -> PushPlan:
    """Upload OUT_DIR to REPO_ID (created if needed; the branch too) in one commit; dry_run uploads nothing."""
    progress = progress or Progress(quiet=True)
    if dry_run:
        return plan_push(out_dir, repo_id, private=private, revision=revision, commit_message=commit_message)
    from huggingface_hub import HfApi


    target = OutDir.resolve(out_dir)
    # no run of ours replaces or rewrites OUT_DIR's files while they upload (where none could: a read-only parent)
    held = target.lock() if os.access(target.path.parent, os.W_OK | os.X_OK) else nullcontext()
    with held:
        plan = plan_push(out_dir, repo_id, private=private, revision=revision, commit_message=commit_message)
        check_token()
        bound_hub_requests()
        api = HfApi()
        with hub_errors("upload", repo_id, plan.revision):
            progress.log(f"creating {repo_id} if needed")
            with_retries(api.create_repo, repo_id, repo_type="model", private=private, exist_ok=True)
            if plan.revision != "main":
                with_retries(api.create_branch, repo_id, branch=plan.revision, repo_type="model", exist_ok=True)
            total = sum(s for _, s in plan.files)
            progress.log(f"uploading {len(plan.files)} files ({total / 2**20:.1f} MiB) to {repo_id}@{plan.revision}")
            with_retries(api.upload_folder, repo_id=repo_id, folder_path=str(plan.out_dir), repo_type="model",
                         revision=plan.revision, commit_message=plan.commit_message,
                         allow_patterns=[glob.escape(n) for n, _ in plan.files], delete_patterns=STALE_PATTERNS)
    progress.log(f"pushed {plan.out_dir} to {repo_id}@{plan.revision}")
    return plan
