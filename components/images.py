"""Container image references for the pipeline's components.

``components/images.yaml`` is the one place that names the images and their versions; every
component's ``base_image`` comes from :func:`image`. An image with a ``digest`` in the YAML is
referenced by digest (``registry/name:version@sha256:...``), so a cluster runs exactly the
image that was tested.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from puzzle.errors import PuzzleError

IMAGES_FILE = Path(__file__).with_name("images.yaml")
GPU_IMAGE = "gpu"
CPU_IMAGE = "cpu"
NEMO_IMAGE = "nemo"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ImageConfigError(PuzzleError, ValueError):
    """``components/images.yaml`` is malformed or does not name the image asked for."""


@lru_cache(maxsize=4)
def load_images(path: Path = IMAGES_FILE) -> dict[str, Any]:
    """The parsed images file (registry, version, images by role)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ImageConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise ImageConfigError(f"{path} must have a mapping 'images' (role -> name)")
    for field in ("registry", "version"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise ImageConfigError(f"{path}: '{field}' must be a non-empty string")
    return data


def image(role: str, path: Path = IMAGES_FILE) -> str:
    """The full reference of the image for ``role`` (``gpu``, ``cpu``, ...)."""
    data = load_images(path)
    spec = data["images"].get(role)
    if not isinstance(spec, dict) or not spec.get("name"):
        raise ImageConfigError(f"{path}: no image for role {role!r}; known roles: {sorted(data['images'])}")
    registry = str(data["registry"]).rstrip("/")
    version = str(spec.get("version") or data["version"])
    ref = f"{registry}/{spec['name']}:{version}"
    digest = spec.get("digest")
    if digest:
        if not _DIGEST.match(str(digest)):
            raise ImageConfigError(
                f"{path}: images.{role}.digest must look like sha256:<64 hex>, got {digest!r}"
            )
        ref = f"{ref}@{digest}"
    return ref
