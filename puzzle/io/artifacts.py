"""Artifacts: directories (local or ``s3://``) described by a ``manifest.json``.

A manifest records the artifact's kind, schema version, the inputs it came from (with their
content hashes), the parameters, the package version, a SHA-256 and size for every file, and a
summary of key figures. :func:`run_phase` is how every phase writes its output: it skips the
work when the output already exists for the same inputs and parameters (resume), gives the
phase a work directory that survives a crash (for checkpoints), verifies inputs' checksums, and
publishes the result atomically (the manifest is written last, so an artifact without a
manifest is never taken as complete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from puzzle import __version__
from puzzle.errors import PuzzleError
from puzzle.io import storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


class ArtifactError(PuzzleError, RuntimeError):
    """An artifact is missing, of the wrong kind, or corrupt; the message says which and the fix."""


def _canonical(obj: Any) -> Any:
    """JSON-normalise parameters so that equal settings compare equal (tuples -> lists, etc.)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@dataclass
class Manifest:
    kind: str
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    code_version: str = __version__
    created_at: float = field(default_factory=time.time)

    @property
    def content_hash(self) -> str:
        """Hash of the artifact's content: every file's checksum, the kind and the schema."""
        payload = json.dumps(
            {
                "kind": self.kind,
                "schema": self.schema_version,
                "files": {k: v["sha256"] for k, v in self.files.items()},
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["content_hash"] = self.content_hash
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Manifest:
        try:
            return cls(
                kind=data["kind"],
                inputs=data.get("inputs", {}),
                parameters=data.get("parameters", {}),
                files=data["files"],
                summary=data.get("summary", {}),
                schema_version=int(data["schema_version"]),
                code_version=data.get("code_version", "?"),
                created_at=float(data.get("created_at", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{where}: manifest.json is malformed ({exc!r}); re-create the artifact"
            ) from exc


def read_manifest(uri: str) -> Manifest | None:
    """The manifest at ``uri``, or None when the artifact does not exist (or is incomplete)."""
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        return None
    try:
        data = storage.read_json(path)
    except storage.StorageError as exc:
        raise ArtifactError(f"{uri}: {exc}") from exc
    return Manifest.from_json(data, uri)


def require_manifest(uri: str, kind: str | tuple[str, ...]) -> Manifest:
    """The manifest of an existing artifact of the given kind, or a clear error."""
    manifest = read_manifest(uri)
    kinds = (kind,) if isinstance(kind, str) else kind
    if manifest is None:
        raise ArtifactError(
            f"no {'/'.join(kinds)} artifact at {uri} (no manifest.json): run the phase that produces it first"
        )
    if manifest.kind not in kinds:
        raise ArtifactError(f"{uri} is a {manifest.kind!r} artifact, expected {'/'.join(kinds)}")
    if manifest.schema_version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{uri} was written with schema {manifest.schema_version}, newer than this package's "
            f"{SCHEMA_VERSION}: upgrade puzzle"
        )
    return manifest


def checksum_dir(local: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(local.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = str(path.relative_to(local))
            files[rel] = {"sha256": storage.sha256_file(path), "size": path.stat().st_size}
    return files


def verify_local(local: Path, manifest: Manifest, where: str) -> None:
    """Check every file's size and SHA-256 against the manifest."""
    for rel, meta in manifest.files.items():
        path = local / rel
        if not path.is_file():
            raise ArtifactError(
                f"{where}: file {rel} listed in manifest.json is missing; re-create the artifact"
            )
        if path.stat().st_size != meta["size"]:
            raise ArtifactError(
                f"{where}: {rel} is {path.stat().st_size} bytes, manifest says {meta['size']} "
                "(truncated or corrupt); re-create the artifact"
            )
        if storage.sha256_file(path) != meta["sha256"]:
            raise ArtifactError(f"{where}: checksum mismatch for {rel} (corrupt); re-create the artifact")


def materialize(uri: str, kind: str | tuple[str, ...] | None = None) -> Path:
    """A verified local directory holding the artifact at ``uri`` (downloaded once when on S3)."""
    manifest = require_manifest(uri, kind) if kind else read_manifest(uri)
    if manifest is None:
        raise ArtifactError(f"no artifact at {uri} (no manifest.json)")
    if not storage.is_s3(uri):
        local = Path(uri)
        verify_local(local, manifest, uri)
        return local
    local = storage.cache_dir_for(f"{uri}#{manifest.content_hash}", "artifacts")
    marker = local / ".verified"
    if marker.exists() and marker.read_text() == manifest.content_hash:
        return local
    for rel in manifest.files:
        storage.download_file(storage.join(uri, rel), local / rel)
    verify_local(local, manifest, uri)
    (local / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
    marker.write_text(manifest.content_hash)
    return local


def fingerprint(uri: str) -> str:
    """Content hash of an input: an artifact's manifest hash, or a hash of plain files/objects."""
    if storage.is_s3(uri):
        manifest = read_manifest(uri)
        if manifest is not None:
            return manifest.content_hash
        client = storage.s3_client()
        bucket, key = storage.split_s3(uri)
        digest = hashlib.sha256()
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            digest.update(f"{key}:{head.get('ETag')}:{head.get('ContentLength')}".encode())
        except Exception:  # noqa: BLE001 - not a single object: hash the prefix listing
            for rel in storage.list_files(uri):
                h = client.head_object(Bucket=bucket, Key=f"{key.rstrip('/')}/{rel}")
                digest.update(f"{rel}:{h.get('ETag')}:{h.get('ContentLength')}".encode())
        return digest.hexdigest()
    path = Path(uri)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(uri)
        assert manifest is not None
        return manifest.content_hash
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(storage.sha256_file(path).encode())
    elif path.is_dir():
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{sub.relative_to(path)}:{storage.sha256_file(sub)}".encode())
    else:
        # A hub id or another non-path reference: its name is all we know.
        digest.update(f"ref:{uri}".encode())
    return digest.hexdigest()


def is_current(
    out: str, kind: str, inputs: Mapping[str, str], parameters: Mapping[str, Any]
) -> Manifest | None:
    """The existing output's manifest when it was made from the same inputs and parameters."""
    try:
        existing = read_manifest(out)
    except ArtifactError:
        return None
    if existing is None or existing.kind != kind or existing.schema_version != SCHEMA_VERSION:
        return None
    if _canonical(existing.parameters) != _canonical(dict(parameters)):
        return None
    want = {name: fingerprint(uri) for name, uri in inputs.items()}
    have = {name: ref.get("hash") for name, ref in existing.inputs.items()}
    return existing if want == have else None


def work_dir_for(out: str) -> Path:
    """A directory that survives a crash, for a phase's staging output and checkpoints."""
    if storage.is_s3(out):
        return storage.cache_dir_for(out, "staging")
    path = Path(f"{out.rstrip('/')}.partial")
    path.mkdir(parents=True, exist_ok=True)
    return path


PhaseBody = Callable[[Path, dict[str, Path]], dict[str, Any]]


def run_phase(
    kind: str,
    out: str,
    inputs: Mapping[str, str],
    parameters: Mapping[str, Any],
    body: Callable[..., dict[str, Any] | None],
    *,
    input_kinds: Mapping[str, str | tuple[str, ...]] | None = None,
    materialize_inputs: bool = True,
    force: bool = False,
) -> Manifest:
    """Produce the artifact ``out`` of ``kind`` from ``inputs`` by calling ``body``, or skip.

    ``body(staging_dir, local_inputs)`` writes the artifact's files into ``staging_dir`` (which
    survives a crash: a phase may keep checkpoints there, under ``.work/``, which is not
    published) and returns a summary dict of key figures for the manifest. ``local_inputs`` maps
    each input name to a verified local directory (artifacts) or, for plain inputs (a parent
    directory, a GGUF file, a hub id), to the reference itself when ``materialize_inputs`` is off
    or the input is not an artifact.
    """
    params = _canonical(dict(parameters))
    if not force:
        current = is_current(out, kind, inputs, params)
        if current is not None:
            log.info("%s: %s is up to date (same inputs and parameters), skipping", kind, out)
            return current
    input_kinds = dict(input_kinds or {})
    input_refs: dict[str, dict[str, str]] = {}
    local_inputs: dict[str, Path] = {}
    for name, uri in inputs.items():
        if name in input_kinds:
            require_manifest(uri, input_kinds[name])
        input_refs[name] = {"uri": uri, "hash": fingerprint(uri)}
        if materialize_inputs and read_manifest(uri) is not None:
            local_inputs[name] = materialize(uri)
        else:
            local_inputs[name] = Path(uri)
    staging = work_dir_for(out)
    stamp = staging / ".work" / "request.json"
    request = {"kind": kind, "inputs": input_refs, "parameters": params}
    if stamp.exists() and json.loads(stamp.read_text()) != request:
        log.info("%s: staging %s was for other inputs/parameters; starting afresh", kind, staging)
        shutil.rmtree(staging)
        staging.mkdir(parents=True)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(request, sort_keys=True))
    log.info("%s: building %s", kind, out)
    summary = body(staging, local_inputs) or {}
    work = staging / ".work"
    if work.exists():
        shutil.rmtree(work)
    manifest = Manifest(
        kind=kind,
        inputs=input_refs,
        parameters=params,
        files=checksum_dir(staging),
        summary=_canonical(summary),
    )
    publish(staging, out, manifest)
    return manifest


def publish(staging: Path, out: str, manifest: Manifest) -> None:
    """Move a finished staging directory to ``out``; the manifest is written last."""
    (staging / MANIFEST).unlink(missing_ok=True)
    if storage.is_s3(out):
        if storage.exists(storage.join(out, MANIFEST)):
            # Invalidate the old artifact first so a crash mid-upload leaves no valid manifest.
            storage.delete_tree(out)
        for rel in manifest.files:
            storage.upload_file(staging / rel, storage.join(out, rel))
        storage.write_json(storage.join(out, MANIFEST), manifest.to_json())
        shutil.rmtree(staging, ignore_errors=True)
        return
    target = Path(out)
    (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)


def delete_if_exists(uri: str) -> None:
    """Remove an artifact (and its staging directory) so that the next run rebuilds it."""
    if storage.exists(storage.join(uri, MANIFEST)) or (not storage.is_s3(uri) and Path(uri).exists()):
        storage.delete_tree(uri)
    if not storage.is_s3(uri):
        shutil.rmtree(f"{uri.rstrip('/')}.partial", ignore_errors=True)
