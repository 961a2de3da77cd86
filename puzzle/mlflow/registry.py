"""MLflow Model Registry: register exported children with lineage, and promote them through a gate.

An exported child (a Hugging Face checkpoint in the Nemotron-NAS layout, written by
:func:`puzzle.child.export.export`) is logged as plain artifacts under ``checkpoint/`` of a run and
registered with ``create_model_version(source=<that directory>)``. The version's files are the
checkpoint itself: ``mlflow artifacts download -u models:/NAME/VERSION`` gives a directory that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` and serving engines load
as is, and that ``puzzle run`` accepts as a parent.

Version tags carry the lineage (``puzzle.parent_uri``, ``puzzle.parent_model``,
``puzzle.parent_version``, ``puzzle.constraints``, ``puzzle.accuracy_kept``, ``puzzle.speedup``,
``puzzle.pipeline_run_id``, ``puzzle.kfp_run_id``) and the export's content hash
(``puzzle.content_hash``): registering the same child again returns the existing version.
Aliases, not stages: ``candidate`` on registration, ``champion`` only when :func:`promote` finds
the configured targets met.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.config import RegistryConfig, SearchConfig, TrackingConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts, storage
from puzzle.mlflow import tracking

log = logging.getLogger(__name__)

EXPORT_KIND = "export"
ALIAS_CANDIDATE = "candidate"
ALIAS_CHAMPION = "champion"
CHECKPOINT_PATH = "checkpoint"

TAG_CONTENT_HASH = "puzzle.content_hash"
TAG_PARENT_URI = "puzzle.parent_uri"
TAG_PARENT_MODEL = "puzzle.parent_model"
TAG_PARENT_VERSION = "puzzle.parent_version"
TAG_CONSTRAINTS = "puzzle.constraints"
TAG_ACCURACY_KEPT = "puzzle.accuracy_kept"
TAG_SPEEDUP = "puzzle.speedup"
TAG_PIPELINE_RUN = "puzzle.pipeline_run_id"
TAG_KFP_RUN_ID = "puzzle.kfp_run_id"
TAG_PROFILE = "puzzle.profile"
TAG_GATE = "puzzle.gate"
TAG_GATE_REASON = "puzzle.gate_reason"

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))?/?$")


class RegistryError(PuzzleError, RuntimeError):
    """Registration or promotion cannot proceed; the message says why and the fix."""


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """``models:/name/3`` -> ``("name", "3", None)``; ``models:/name@champion`` -> alias; else None."""
    match = _MODELS_URI.match(uri)
    if match is None:
        return None
    return match["name"], match["version"], match["alias"]


@dataclass(frozen=True, kw_only=True)
class Lineage:
    """Where a child came from; becomes the registered version's tags."""

    parent_uri: str
    constraints: list[str] = field(default_factory=list)
    accuracy_kept: float | None = None
    speedup: float | None = None
    pipeline_run_id: str | None = None
    kfp_run_id: str | None = None
    profile: str | None = None

    def tags(self) -> dict[str, str]:
        tags = {
            TAG_PARENT_URI: self.parent_uri,
            TAG_CONSTRAINTS: json.dumps(list(self.constraints)),
        }
        parsed = parse_models_uri(self.parent_uri)
        if parsed is not None:
            tags[TAG_PARENT_MODEL] = parsed[0]
            if parsed[1] is not None:
                tags[TAG_PARENT_VERSION] = parsed[1]
        optional = {
            TAG_ACCURACY_KEPT: self.accuracy_kept,
            TAG_SPEEDUP: self.speedup,
            TAG_PIPELINE_RUN: self.pipeline_run_id,
            TAG_KFP_RUN_ID: self.kfp_run_id,
            TAG_PROFILE: self.profile,
        }
        tags.update({k: str(v) for k, v in optional.items() if v is not None})
        return tags


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    source: str
    created: bool
    """False when the same child (same content hash) was already registered."""

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str]
    accuracy_kept: float | None
    speedup: float | None


def _client(tracking_uri: str | None) -> Any:
    uri = tracking.resolve_tracking_uri(override=tracking_uri)
    if uri is None:
        raise RegistryError(
            "no MLflow tracking URI: set MLFLOW_TRACKING_URI (or tracking.uri in the config) to the MLflow "
            "server"
        )
    return tracking.client_for(uri)


def _check_name(name: str) -> None:
    if not name or not name.strip() or "'" in name or "/" in name:
        raise RegistryError(
            f"registry.model_name {name!r} is not a valid registered model name (no quotes or slashes)"
        )


def find_version_by_hash(client: Any, name: str, content_hash: str) -> Any | None:
    versions = client.search_model_versions(f"name='{name}' and tags.`{TAG_CONTENT_HASH}` = '{content_hash}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def registered_version(export_uri: str, model_name: str, *, tracking_uri: str | None = None) -> str:
    """The version of ``model_name`` that holds the export at ``export_uri`` (by content hash)."""
    _check_name(model_name)
    content_hash = artifacts.require_manifest(export_uri, EXPORT_KIND).content_hash
    version = find_version_by_hash(_client(tracking_uri), model_name, content_hash)
    if version is None:
        raise RegistryError(f"{export_uri} is not registered under {model_name!r}: register it first")
    return str(version.version)


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                description="Children compressed with Puzzle (distillation-based NAS); see version tags for "
                "lineage.",
            )
        except MlflowException:  # created concurrently
            client.get_registered_model(name)


def _description(lineage: Lineage, export_uri: str) -> str:
    lines = [f"Puzzle child of `{lineage.parent_uri}`, exported from `{export_uri}`."]
    if lineage.constraints:
        lines.append("Constraints: " + ", ".join(f"`{c}`" for c in lineage.constraints) + ".")
    if lineage.accuracy_kept is not None:
        lines.append(f"Accuracy kept: {lineage.accuracy_kept:.2%}.")
    if lineage.speedup is not None:
        lines.append(f"Measured speedup: {lineage.speedup:.2f}x.")
    lines.append("Load with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.")
    return "\n\n".join(lines)


def register_child(
    export_uri: str,
    model_name: str,
    lineage: Lineage,
    *,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    alias: str = ALIAS_CANDIDATE,
) -> Registration:
    """Register the exported child at ``export_uri`` as a version of ``model_name`` (alias ``candidate``).

    The checkpoint is uploaded to the MLflow artifact store under a run (nested in the active
    pipeline run when there is one). Registering a child that is already registered (same
    content hash) creates nothing and returns the existing version, moving the alias to it.
    """
    _check_name(model_name)
    manifest = artifacts.require_manifest(export_uri, EXPORT_KIND)
    client = _client(tracking_uri)
    content_hash = manifest.content_hash
    _ensure_registered_model(client, model_name)
    if lineage.kfp_run_id is None and tracking.kfp_run_id_from_env():
        lineage = dataclasses.replace(lineage, kfp_run_id=tracking.kfp_run_id_from_env())
    existing = find_version_by_hash(client, model_name, content_hash)
    if existing is not None:
        log.info("registry: %s is already %s version %s", export_uri, model_name, existing.version)
        # Lineage known now but not then (e.g. the requesting profile) is added, never overwritten.
        for key, value in lineage.tags().items():
            if key not in existing.tags:
                client.set_model_version_tag(model_name, existing.version, key, value)
        client.set_registered_model_alias(model_name, alias, existing.version)
        return Registration(model_name, existing.version, existing.source, created=False)

    active = tracking.active_run()
    pipeline_run_id = lineage.pipeline_run_id or (active.run_id if active else None)
    if active is not None and active.tracking_uri == tracking.resolve_tracking_uri(override=tracking_uri):
        experiment_id = active.experiment_id
    else:
        experiment_id = tracking.experiment_id_for(client, experiment)
    run_tags = {
        tracking.TAG_KIND: EXPORT_KIND,
        tracking.TAG_ARTIFACT_URI: export_uri,
        TAG_CONTENT_HASH: content_hash,
    }
    if pipeline_run_id:
        run_tags[tracking.TAG_PARENT_RUN] = pipeline_run_id
    run = client.create_run(experiment_id, run_name=f"register-{model_name}", tags=run_tags)
    run_id = run.info.run_id
    try:
        local = artifacts.materialize(export_uri, EXPORT_KIND)
        log.info("registry: uploading %s to the MLflow artifact store", export_uri)
        client.log_artifacts(run_id, str(local), artifact_path=CHECKPOINT_PATH)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    source = f"{run.info.artifact_uri.rstrip('/')}/{CHECKPOINT_PATH}"
    tags = {**lineage.tags(), TAG_CONTENT_HASH: content_hash}
    if pipeline_run_id:
        tags[TAG_PIPELINE_RUN] = pipeline_run_id
    version = client.create_model_version(
        model_name, source=source, run_id=run_id, tags=tags, description=_description(lineage, export_uri)
    )
    client.set_registered_model_alias(model_name, alias, version.version)
    log.info(
        "registry: registered %s as %s version %s (alias %s)", export_uri, model_name, version.version, alias
    )
    return Registration(model_name, version.version, source, created=True)


def register_parent(
    source: str,
    model_name: str,
    *,
    tracking_uri: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
) -> Registration:
    """Register a parent checkpoint (a Hugging Face directory or a directory with one GGUF file,
    local or ``s3://``) as a version of ``model_name``, so that it can be tagged in the MLflow UI
    to request a Puzzle run. The same files registered again return the existing version."""
    _check_name(model_name)
    client = _client(tracking_uri)
    if storage.is_s3(source):
        # Cached by content, every key checked to stay inside the copy (storage.download_prefix).
        local, files = storage.download_prefix(source, "parents")
        if not files:
            raise RegistryError(f"no files under {source}: upload the parent checkpoint there first")
    else:
        local = Path(source)
        if not local.is_dir():
            raise RegistryError(
                f"parent {source!r} is not a directory (a Hugging Face checkpoint or a GGUF file's folder)"
            )
    if not (local / "config.json").is_file() and not list(local.glob("*.gguf")):
        raise RegistryError(f"{source} holds neither config.json (Hugging Face layout) nor a .gguf file")
    content_hash = artifacts.fingerprint(str(local))
    _ensure_registered_model(client, model_name)
    existing = find_version_by_hash(client, model_name, content_hash)
    if existing is not None:
        return Registration(model_name, existing.version, existing.source, created=False)
    experiment_id = tracking.experiment_id_for(client, experiment)
    run = client.create_run(
        experiment_id, run_name=f"register-parent-{model_name}", tags={TAG_CONTENT_HASH: content_hash}
    )
    try:
        client.log_artifacts(run.info.run_id, str(local), artifact_path=CHECKPOINT_PATH)
    except Exception:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    source_uri = f"{run.info.artifact_uri.rstrip('/')}/{CHECKPOINT_PATH}"
    version = client.create_model_version(
        model_name,
        source=source_uri,
        run_id=run.info.run_id,
        tags={TAG_CONTENT_HASH: content_hash},
        description=f"Parent checkpoint uploaded from `{source}`. Tag a version `puzzle.request=<profile>` "
        "to compress it.",
    )
    log.info("registry: registered parent %s as %s version %s", source, model_name, version.version)
    return Registration(model_name, version.version, source_uri, created=True)


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def gate_reasons(figures: dict[str, float | None], min_accuracy_kept: float, min_speedup: float) -> list[str]:
    """Why a child fails the gates (empty: it passes): a missing or non-finite figure fails, never
    passes; a non-finite target (NaN would make every comparison false) is an error."""
    for name, target in (("min_accuracy_kept", min_accuracy_kept), ("min_speedup", min_speedup)):
        if isinstance(target, bool) or not isinstance(target, int | float) or not math.isfinite(target):
            raise RegistryError(
                f"registry.gates.{name} must be a finite number, got {target!r}: the gate cannot decide "
                "with it, so nothing is promoted"
            )
    reasons = []
    accuracy, speedup = figures.get("accuracy_kept"), figures.get("speedup")
    for key, value in (("accuracy_kept", accuracy), ("speedup", speedup)):
        if value is not None and not math.isfinite(value):
            reasons.append(f"{key} is {value} (not a finite number)")
    if reasons:
        return reasons
    if accuracy is None:
        reasons.append(f"no {TAG_ACCURACY_KEPT} figure (evaluate the child before the gate)")
    elif not accuracy >= min_accuracy_kept:
        reasons.append(f"accuracy kept {accuracy:.4g} < target {min_accuracy_kept:.4g}")
    if speedup is None:
        reasons.append(f"no {TAG_SPEEDUP} figure (evaluate the child before the gate)")
    elif not speedup >= min_speedup:
        reasons.append(f"speedup {speedup:.4g} < target {min_speedup:.4g}")
    return reasons


def lineage(
    parent_uri: str,
    evaluation: str,
    search: SearchConfig,
    *,
    pipeline_run_id: str | None = None,
    kfp_run_id: str | None = None,
    profile: str | None = None,
) -> Lineage:
    """The lineage of a child: its parent, the constraints it was searched under and its evaluation."""
    figures = figures_from_evaluation(evaluation)
    return Lineage(
        parent_uri=parent_uri,
        constraints=list(search.constraints),
        accuracy_kept=figures.get("accuracy_kept"),
        speedup=figures.get("speedup"),
        pipeline_run_id=pipeline_run_id,
        kfp_run_id=kfp_run_id or None,
        profile=profile or None,
    )


def promote(
    model_name: str,
    version: str,
    *,
    min_accuracy_kept: float,
    min_speedup: float,
    tracking_uri: str | None = None,
    alias: str = ALIAS_CHAMPION,
) -> GateResult:
    """The gate: move alias ``champion`` to ``version`` only when its accuracy kept and measured
    speedup (version tags) meet the targets. The outcome is written as ``puzzle.gate`` tags."""
    _check_name(model_name)
    client = _client(tracking_uri)
    mv = client.get_model_version(model_name, str(version))
    accuracy = _tag_float(mv.tags, TAG_ACCURACY_KEPT)
    speedup = _tag_float(mv.tags, TAG_SPEEDUP)
    reasons = gate_reasons({"accuracy_kept": accuracy, "speedup": speedup}, min_accuracy_kept, min_speedup)
    passed = not reasons
    if passed:
        client.set_registered_model_alias(model_name, alias, str(version))
        reason = (
            f"accuracy kept {accuracy:.4g} >= {min_accuracy_kept:.4g}, speedup {speedup:.4g} >= "
            f"{min_speedup:.4g}"
        )
    else:
        reason = "; ".join(reasons)
    client.set_model_version_tag(model_name, str(version), TAG_GATE, "passed" if passed else "failed")
    client.set_model_version_tag(model_name, str(version), TAG_GATE_REASON, reason)
    log.info(
        "registry: gate %s for %s version %s: %s",
        "passed" if passed else "failed",
        model_name,
        version,
        reason,
    )
    return GateResult(passed, reasons, accuracy, speedup)


def aliases(model_name: str, version: str, *, tracking_uri: str | None = None) -> list[str]:
    """The aliases currently pointing at a version."""
    return sorted(_client(tracking_uri).get_model_version(model_name, str(version)).aliases)


def figures_from_evaluation(evaluation_uri: str) -> dict[str, float]:
    """``accuracy_kept`` and ``speedup`` from an evaluation artifact's ``metrics.json``.

    Top-level keys win; otherwise the first nested key ending in the name (e.g. ``child.speedup``).
    """
    artifacts.require_manifest(evaluation_uri, "evaluation")
    data = storage.read_json(storage.join(evaluation_uri, "metrics.json"))
    flat = tracking.flatten(data) if isinstance(data, dict) else {}
    out: dict[str, float] = {}
    for name in ("accuracy_kept", "speedup"):
        keys = [name] + sorted(k for k in flat if k.endswith(f".{name}"))
        for key in keys:
            value = flat.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[name] = float(value)
                break
    return out


def download(model_uri: str, dst: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Download a registered version's checkpoint (``models:/name/version`` or ``@alias``)."""
    import mlflow

    uri = tracking.resolve_tracking_uri(override=tracking_uri)
    if uri is None:
        raise RegistryError("no MLflow tracking URI: set MLFLOW_TRACKING_URI to download registered models")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


def register_and_gate(
    parent: str,
    export: str,
    evaluation: str,
    *,
    registry: RegistryConfig,
    tracking: TrackingConfig,
    search: SearchConfig,
    output: str | None = None,
    pipeline_run_id: str | None = None,
    kfp_run_id: str | None = None,
    profile: str | None = None,
) -> tuple[Registration, GateResult]:
    """Phase ``register``: the exported child becomes a version of ``registry.model_name`` (alias
    ``candidate``) with its lineage, then the gate moves ``champion`` to it when the evaluation
    meets ``registry.gates``."""
    from puzzle.mlflow import tracking as mlflow_tracking

    assert registry.model_name is not None, "the register stage runs only when registry.model_name is set"
    tracking_uri = mlflow_tracking.resolve_tracking_uri(tracking.uri, output)
    child_lineage = lineage(
        parent, evaluation, search, pipeline_run_id=pipeline_run_id, kfp_run_id=kfp_run_id, profile=profile
    )
    registration = register_child(
        export, registry.model_name, child_lineage, experiment=tracking.experiment, tracking_uri=tracking_uri
    )
    gate = promote(
        registry.model_name,
        registration.version,
        min_accuracy_kept=registry.gates.min_accuracy_kept,
        min_speedup=registry.gates.min_speedup,
        tracking_uri=tracking_uri,
    )
    return registration, gate
