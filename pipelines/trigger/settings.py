"""The trigger service's settings: command-line flags, with ``PUZZLE_TRIGGER_*`` variables as defaults.

The webhook secret comes from ``PUZZLE_TRIGGER_SECRET`` or a file (``--secret-file``, e.g. a
mounted Kubernetes secret); it is never printed (``repr`` hides it) and never logged.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError

REQUEST_TAG = "puzzle.request"
REQUEST_ALIAS = "puzzle-request"
# Tags the service (and its runs) write back on the parent version; it never acts on them.
TAG_RUN_ID = "puzzle.kfp_run_id"
TAG_STATE = "puzzle.state"
TAG_PROFILE = "puzzle.profile"
TAG_BACKEND = "puzzle.backend"
TAG_CHILD = "puzzle.child"
TAG_ERROR = "puzzle.error"
OWN_TAGS = (TAG_RUN_ID, TAG_STATE, TAG_PROFILE, TAG_BACKEND, TAG_CHILD, TAG_ERROR)

BACKENDS = ("local", "kfp")
_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")


class TriggerConfigError(PuzzleError, ValueError):
    """The trigger service is misconfigured; the message names the setting and the fix."""


@dataclass(frozen=True, kw_only=True)
class TriggerSettings:
    tracking_uri: str
    """The MLflow server the webhooks come from and the tags go back to."""
    secret: str = field(repr=False)
    """The webhook's HMAC secret (the same one given to ``register-webhook``)."""
    request_tag: str = REQUEST_TAG
    """A model-version tag ``<request_tag>=<profile>`` requests a run with that profile."""
    request_alias: str = REQUEST_ALIAS
    """Setting this alias on a parent version requests a run with ``alias_profile``."""
    alias_profile: str = "default"
    profiles_dir: str | None = None
    """Directory of ``<profile>.yaml`` run configs; ``default`` is the embedded default config."""
    child_model: str = "{model}-puzzle"
    """Registered model of the children; ``{model}`` is the parent's registered model name."""
    state_db: str = "puzzle-trigger.sqlite"
    """SQLite file remembering delivery ids and submissions across restarts."""
    window_s: float = 300.0
    """Deliveries whose timestamp is further than this from now are rejected (replays)."""
    max_body_bytes: int = 64 * 1024
    backend: str = "local"
    reconcile_interval_s: float = 60.0
    """Seconds between reconcile passes (0: no loop; ``puzzle trigger reconcile`` runs one)."""
    overrides: tuple[str, ...] = ()
    """``key.sub=value`` overrides applied to every profile (e.g. tiny budgets for development)."""
    # local backend
    work_dir: str = "./puzzle-trigger-runs"
    """Where the local backend keeps each run's config, output and log."""
    # kfp backend
    kfp_host: str | None = None
    kfp_namespace: str | None = None
    kfp_experiment: str = "puzzle"
    pipeline_package: str | None = None
    """The compiled pipeline YAML submitted by the kfp backend."""
    serving_uri: str = ""
    """kfp backend: ``s3://`` prefix the exported checkpoints are published to (empty: pipeline root only)."""
    gpu_product: str | None = None
    """kfp backend: the ``nvidia.com/gpu.product`` node label costs and speed are measured on."""

    def __post_init__(self) -> None:
        if not self.tracking_uri:
            raise TriggerConfigError("--tracking-uri (or MLFLOW_TRACKING_URI) must name the MLflow server")
        if not self.secret:
            raise TriggerConfigError(
                "no webhook secret: set PUZZLE_TRIGGER_SECRET or --secret-file "
                "(unsigned webhooks are never accepted)"
            )
        if self.request_tag in OWN_TAGS:
            raise TriggerConfigError(
                f"--request-tag {self.request_tag!r} is one of the tags the service writes back"
            )
        if not _ALIAS.match(self.request_alias):
            raise TriggerConfigError(
                f"--request-alias {self.request_alias!r} must be letters, digits, '-' or '_'"
            )
        if self.window_s <= 0:
            raise TriggerConfigError(f"--window must be > 0 seconds, got {self.window_s}")
        if self.max_body_bytes <= 0:
            raise TriggerConfigError(f"--max-body-bytes must be > 0, got {self.max_body_bytes}")
        if self.backend not in BACKENDS:
            raise TriggerConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "kfp" and not (self.kfp_host and self.pipeline_package):
            raise TriggerConfigError(
                "--backend kfp needs --kfp-host and --pipeline-package (the compiled pipeline YAML)"
            )
        if not self.child_model.strip():
            raise TriggerConfigError("--child-model must not be empty")
        if self.profiles_dir is not None and not Path(self.profiles_dir).is_dir():
            raise TriggerConfigError(
                f"--profiles {self.profiles_dir!r} is not a directory of <profile>.yaml files"
            )

    def replace(self, **changes: Any) -> TriggerSettings:
        return dataclasses.replace(self, **changes)


def secret_from(value: str | None, path: str | None) -> str:
    """The secret from a file (stripped of its trailing newline) or a value."""
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise TriggerConfigError(f"--secret-file {path}: cannot read it ({exc.strerror})") from exc
    return value or ""


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"PUZZLE_TRIGGER_{name}", default)
