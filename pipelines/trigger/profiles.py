"""Profiles: the value of a ``puzzle.request`` tag names a run configuration.

A profile is ``<profiles_dir>/<name>.yaml``, a ``puzzle run`` config (:mod:`puzzle.config`);
``default`` without such a file is the embedded default. The parent is always the requesting
model version (``models:/NAME/VERSION``), whatever the profile says.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from puzzle.config import ConfigError, RunConfig, load_config
from puzzle.errors import PuzzleError

PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_PROFILE = "default"


class ProfileError(PuzzleError, ValueError):
    """A requested profile does not exist or is not a valid run configuration."""


def known_profiles(profiles_dir: str | None) -> list[str]:
    names = {DEFAULT_PROFILE}
    if profiles_dir:
        names.update(p.stem for p in Path(profiles_dir).glob("*.yaml") if PROFILE_NAME.match(p.stem))
    return sorted(names)


def run_config(
    profile: str,
    parent_uri: str,
    *,
    profiles_dir: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
) -> RunConfig:
    """The validated run configuration of ``profile`` for the parent at ``parent_uri``."""
    if not PROFILE_NAME.match(profile):
        raise ProfileError(
            f"profile {profile!r} is not a profile name (letters, digits, '.', '_', '-'); known: "
            f"{', '.join(known_profiles(profiles_dir))}"
        )
    path = Path(profiles_dir) / f"{profile}.yaml" if profiles_dir else None
    if path is None or not path.is_file():
        if profile != DEFAULT_PROFILE:
            raise ProfileError(
                f"unknown profile {profile!r}; known: {', '.join(known_profiles(profiles_dir))}"
            )
        path = None
    try:
        return load_config(
            str(path) if path else None, [*overrides, f"parent={json.dumps(parent_uri)}"], check_access=False
        )
    except ConfigError as exc:
        raise ProfileError(f"profile {profile!r} is not a valid run configuration: {exc}") from exc
