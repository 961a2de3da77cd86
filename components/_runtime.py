"""What every component does around its one call into ``puzzle``.

Component functions are shipped to the cluster as their own source, so they import this module
(and ``puzzle``) inside their body; the component images have both installed. Nothing here
imports kfp: artifacts are duck-typed (``.path``, ``.uri``, ``.metadata``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol


class KfpArtifact(Protocol):
    path: str
    uri: str
    metadata: dict[str, Any]


def setup_logging() -> None:
    """Show the library's progress in the pod's log (the executor only configures its own)."""
    logging.basicConfig(
        level=os.environ.get("PUZZLE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("urllib3", "botocore", "filelock", "matplotlib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def out_path(artifact: KfpArtifact) -> str:
    """The local directory a phase writes an output artifact to (its parent exists)."""
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    return artifact.path


def describe(artifact: KfpArtifact, manifest: Any, **extra: Any) -> dict[str, Any]:
    """Record an artifact's manifest (kind, content hash, size, key figures) as KFP metadata."""
    files = manifest.files
    metadata = {
        "kind": manifest.kind,
        "content_hash": manifest.content_hash,
        "num_files": len(files),
        "size_bytes": int(sum(meta["size"] for meta in files.values())),
        "code_version": manifest.code_version,
        **{k: v for k, v in manifest.summary.items() if _scalar(v)},
        **extra,
    }
    artifact.metadata.update(metadata)
    return metadata


def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def copy_artifact(local: str, uri: str) -> bool:
    """Copy a finished local artifact to ``uri`` (local or s3://), the manifest last.

    Returns False (and copies nothing) when ``uri`` already holds the same content, so a retried
    or cached step does not upload again.
    """
    from puzzle.io import artifacts, storage

    manifest = artifacts.read_manifest(local)
    if manifest is None:
        raise artifacts.ArtifactError(
            f"{local} has no manifest.json: the phase did not finish; nothing to copy"
        )
    existing = artifacts.read_manifest(uri) if storage.exists(storage.join(uri, artifacts.MANIFEST)) else None
    if existing is not None and existing.content_hash == manifest.content_hash:
        logging.getLogger(__name__).info("%s already holds this artifact; not copying", uri)
        return False
    if existing is not None:
        # Invalidate first: a crash mid-copy must not leave a manifest over mixed files.
        storage.delete_tree(uri)
    for rel in manifest.files:
        storage.upload_file(Path(local) / rel, storage.join(uri, rel))
    storage.write_json(storage.join(uri, artifacts.MANIFEST), manifest.to_json())
    return True


def track(
    artifact: KfpArtifact,
    manifest: Any,
    *,
    phase: str,
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
) -> str | None:
    """Log a phase's artifact as a nested MLflow run of this KFP run; returns its run id.

    A no-op without a tracking URI (the argument, else ``MLFLOW_TRACKING_URI`` from the
    cluster's secret). Tracking never fails a phase whose artifact is already written: the
    error goes to the log and to the artifact's metadata, and the exit handler still closes
    the run.
    """
    from puzzle.mlflow import tracking

    try:
        with tracking.pipeline_run(
            name=f"puzzle-{kfp_run_id}" if kfp_run_id else "puzzle",
            tracking_uri=tracking_uri or None,
            experiment=experiment or None,
            kfp_run_id=kfp_run_id or None,
        ) as run:
            if run is None:
                return None
            phase_run = run.log_phase(manifest.kind, artifact.path, manifest, name=phase)
            run.set_tags({tracking.TAG_ARTIFACT_URI: artifact.uri}, run_id=phase_run)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).error(
            "tracking %s in MLflow failed: %s: %s", phase, type(exc).__name__, exc
        )
        artifact.metadata["tracking_error"] = f"{type(exc).__name__}: {exc}"
        return None
    artifact.metadata["mlflow_run_id"] = phase_run
    return phase_run
