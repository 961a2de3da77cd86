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


def sections(stage_name: str, configs: dict[str, Any]) -> dict[str, Any]:
    """The typed, validated config sections a stage takes, from the component's ``*_config`` dicts
    (a wrong field fails here, naming it, before any work)."""
    from puzzle.config import parse_section
    from puzzle.stages import stage

    return {name: parse_section(name, configs.get(name)) for name in stage(stage_name).sections}


def run_stage(
    stage_name: str,
    inputs: dict[str, Any],
    output: KfpArtifact,
    configs: dict[str, Any],
    *,
    leading: tuple[Any, ...] = (),
    device: str = "auto",
    **kwargs: Any,
) -> Any:
    """Call the phase function of ``stage_name`` (:mod:`puzzle.stages`) on the component's artifacts:
    ``function(*leading, *inputs, output, **sections, device=..., **kwargs)``; returns its manifest."""
    from puzzle.stages import stage

    s = stage(stage_name)
    args = [*leading, *(_path(inputs[name]) for name in s.inputs)]
    options = {**sections(stage_name, configs), **kwargs}
    if s.gpu:
        options["device"] = device
    return s.resolve()(*args, out_path(output), **options)


def phase(
    stage_name: str,
    inputs: dict[str, Any],
    output: KfpArtifact,
    configs: dict[str, Any],
    *,
    tracked: tuple[dict[str, Any], str] | None = None,
    **kwargs: Any,
) -> Any:
    """What a stage's component does: run the phase (:func:`run_stage`), record its manifest as the
    output's KFP metadata and, with ``tracked`` (the tracking section and the KFP run id), log it
    as an MLflow phase run."""
    setup_logging()
    manifest = run_stage(stage_name, inputs, output, configs, **kwargs)
    describe(output, manifest, **({"shard": kwargs["shard"]} if "shard" in kwargs else {}))
    if tracked is not None:
        track(output, manifest, phase=stage_name, tracking_config=tracked[0], kfp_run_id=tracked[1])
    return manifest


def shard_of(stage_name: str, config: dict[str, Any], index: Any) -> str:
    """``"i/n"`` for shard ``index`` of a sharded stage (its count is in its section's ``shards``).
    Loop items and numbers from Collected/JSON may arrive as floats."""
    section = stage_name
    return f"{int(index)}/{sections(stage_name, {section: config})[section].shards}"


def _path(value: Any) -> Any:
    return value.path if hasattr(value, "path") else value


def track(
    artifact: KfpArtifact,
    manifest: Any,
    *,
    phase: str,
    tracking_config: dict[str, Any] | None = None,
    kfp_run_id: str = "",
    subfolder: str = "",
) -> str | None:
    """Log a phase's artifact as a nested MLflow run of this KFP run; returns its run id.

    ``subfolder``: the artifact is the folder of that name inside the KFP artifact (a component
    that writes one artifact per item).

    A no-op without a tracking URI (``tracking_config["uri"]``, else ``MLFLOW_TRACKING_URI`` from the
    cluster's secret). Tracking never fails a phase whose artifact is already written: the
    error goes to the log and to the artifact's metadata, and the exit handler still closes
    the run.
    """
    from puzzle.mlflow import tracking

    settings = tracking_settings(tracking_config)
    try:
        with tracking.pipeline_run(
            name=f"puzzle-{kfp_run_id}" if kfp_run_id else "puzzle",
            tracking_uri=settings.uri,
            experiment=settings.experiment,
            kfp_run_id=kfp_run_id or None,
        ) as run:
            if run is None:
                return None
            path = str(Path(artifact.path) / subfolder) if subfolder else artifact.path
            uri = f"{artifact.uri.rstrip('/')}/{subfolder}" if subfolder else artifact.uri
            phase_run = run.log_phase(manifest.kind, path, manifest, name=phase)
            run.set_tags({tracking.TAG_ARTIFACT_URI: uri}, run_id=phase_run)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).error(
            "tracking %s in MLflow failed: %s: %s", phase, type(exc).__name__, exc
        )
        artifact.metadata[f"{subfolder}.tracking_error" if subfolder else "tracking_error"] = (
            f"{type(exc).__name__}: {exc}"
        )
        return None
    artifact.metadata[f"{subfolder}.mlflow_run_id" if subfolder else "mlflow_run_id"] = phase_run
    return phase_run


def tracking_settings(tracking_config: dict[str, Any] | None) -> Any:
    """The ``tracking`` section in a pod: ``run-dir`` (a local store) means the cluster's
    ``MLFLOW_TRACKING_URI``, like null."""
    from puzzle.config import parse_section

    settings = parse_section("tracking", tracking_config)
    if settings.uri == "run-dir":
        settings = type(settings)(uri=None, experiment=settings.experiment)
    return settings
