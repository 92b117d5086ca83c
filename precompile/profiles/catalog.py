"""The catalog of profiles: the shipped set in configs/, picking the one for a config.json, loading a
user's profile file or the one a conversion's manifest recorded, and the refusal list.

A profile is YAML data that says where layer 0's parts live (see `precompile.profiles.sections`); this module
finds and reads them. `python -m precompile.profiles --write-key-table` regenerates configs/README.md's key
table from the schema (`write_key_table`).
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from precompile.errors import UserError
from precompile.profiles.bounded_yaml import parse_user_yaml, read_yaml, read_yaml_text
from precompile.profiles.profile_resolution import Profile, validate_profile
from precompile.profiles.sections import ProfileDef
from precompile.profiles.shipped import configs_dir
from precompile.profiles.yaml_schema import key_table

if TYPE_CHECKING:  # the loader imports torch; profiles are read without it
    from precompile.loader import Manifest


def load_profile(path: str | Path, validate: bool = True) -> Profile:
    """Read and validate one YAML profile (validate=False: read it only; see `select_profile`)."""
    path = Path(path)
    return _profile_from_text(path, read_yaml_text(path, "profile", " to --profile"), validate)


def _profile_from_text(path: Path, text: str, validate: bool) -> Profile:
    """The profile file `path` whose text has been read."""
    data = parse_user_yaml(text, f"profile {path}")
    if validate:
        validate_profile(data, str(path))
    return Profile(name=data["name"], path=str(path), data=data, text=text)


def recorded_profile(manifest: Manifest, where: str) -> Profile | None:
    """The profile a conversion was made with, from its manifest (`where`); None for manifests without it."""
    rec = manifest.profile
    text = rec.text
    if text is None:
        return None
    label = f"{where} (the profile recorded from {rec.path})"
    data = parse_user_yaml(text, label, "the manifest is damaged, pass --profile or convert again")
    validate_profile(data, label)
    return Profile(name=data["name"], path=str(rec.path or where), data=data, text=text)


def conversion_profile(manifest: Manifest, config: dict, where: str, profile_path: str | Path | None = None) -> Profile:
    """The profile of an existing conversion: --profile, else the one its manifest records, else (older
    manifests) the shipped profile of the recorded name, else the one config.json selects."""
    if profile_path is not None:
        return load_profile(profile_path)
    recorded = recorded_profile(manifest, where)
    if recorded is not None:
        return recorded
    name = manifest.profile.name
    for p in builtin_profiles():
        if p.name == name:
            return p
    return select_profile(config)


def builtin_profiles(validate: bool = True, mentioning: Collection[str] = ()) -> list[Profile]:
    """The profiles shipped in configs/, sorted by name.

    Picking one needs neither all of them nor their parsed definitions, which were most of what `plan` on a
    config cost: validate=False only reads them (`select_profile` validates the one it picks; tests validate
    every shipped one), and `mentioning` keeps those whose YAML text contains one of these names (a
    profile whose match keys list a name contains it, so matching among them picks the same profile)."""
    paths = sorted(p for p in configs_dir().glob("*.yaml") if not p.name.startswith("_"))
    texts = ((p, read_yaml_text(p, "profile", " to --profile")) for p in paths)  # each file read once
    return [_profile_from_text(p, text, validate) for p, text in texts
            if not mentioning or any(n in text for n in mentioning)]


def match_names(config: dict) -> list[str]:
    """config.json's names that select a shipped profile: its architectures, then its model_type."""
    return [n for n in [*(config.get("architectures") or []), config.get("model_type")] if isinstance(n, str)]


def match_keys(profile: Profile, key: str) -> tuple[str, ...]:
    """A profile's `match.architectures` or `match.model_types` as its YAML lists them, read without parsing
    the profile (the same names the parsed Match holds, for a valid one)."""
    match = profile.data.get("match") if isinstance(profile.data, dict) else None
    names = match.get(key) if isinstance(match, dict) else None
    return tuple(n for n in names if isinstance(n, str)) if isinstance(names, list) else ()


def refusals() -> dict[str, str]:
    """model_type -> why the trick does not apply to it (configs/_refused.yaml)."""
    data = read_yaml(configs_dir() / "_refused.yaml", "refusal list")
    out = {}
    for entry in data["refused"]:
        for mt in entry["model_types"]:
            out[mt] = entry["reason"]
    return out


def select_profile(config: dict, profile_path: str | Path | Profile | None = None,
                   shipped: list[Profile] | None = None) -> Profile:
    """Pick the profile for a config.json: an explicit file (or an already loaded Profile, e.g. one recorded
    in a manifest), else by architectures, then model_type.

    `shipped`: builtin_profiles() when the caller has already read them.
    """
    if isinstance(profile_path, Profile):
        return profile_path
    if profile_path is not None:
        return load_profile(profile_path)
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    reason = refusals().get(model_type or "")
    if reason:
        raise UserError(f"model type '{model_type}' cannot be precompiled: {reason}")
    profiles = builtin_profiles(validate=False, mentioning=match_names(config)) if shipped is None else shipped
    chosen = next((p for arch in archs for p in profiles if arch in match_keys(p, "architectures")), None) or \
        next((p for p in profiles if model_type in match_keys(p, "model_types")), None)
    if chosen is not None:
        if shipped is None:  # read unvalidated above
            validate_profile(chosen.data, chosen.path)
        return chosen
    known = ", ".join(sorted({a for p in (shipped or builtin_profiles(validate=False))
                              for a in match_keys(p, "architectures")}))
    what = f"architecture {archs[0]}" if archs else f"model type '{model_type}'"
    raise UserError(f"no profile for {what}; supported: {known}. "
                    f"Write one (configs/README.md) and pass it with --profile")


def write_key_table(readme: Path) -> bool:
    """Rewrite the generated key table between the markers in configs/README.md; True when it changed."""
    text = readme.read_text(encoding="utf-8")
    begin, end = KEY_TABLE_MARKERS
    if begin not in text or end not in text:
        raise UserError(f"{readme} lacks the markers {begin} ... {end}; put them where the key table belongs")
    head, rest = text.split(begin, 1)
    new = f"{head}{begin}\n{key_table(ProfileDef)}{end}{rest.split(end, 1)[1]}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


KEY_TABLE_MARKERS = ("<!-- key table: generated by `python -m precompile.profiles --write-key-table` -->",
                     "<!-- end of key table -->")


def main(argv: list[str]) -> int:
    """`python -m precompile.profiles --write-key-table [README]` (default: configs/README.md)."""
    if not argv or argv[0] != "--write-key-table" or len(argv) > 2:
        print("usage: python -m precompile.profiles --write-key-table [configs/README.md]", file=sys.stderr)
        return 2
    readme = Path(argv[1]) if len(argv) > 1 else configs_dir() / "README.md"
    print(f"{readme}: {'rewritten' if write_key_table(readme) else 'up to date'}")
    return 0
