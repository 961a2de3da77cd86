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
            manifest = cls(
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
        if not isinstance(manifest.files, dict):
            raise ArtifactError(f"{where}: manifest.json 'files' is not a mapping; re-create the artifact")
        for rel, meta in manifest.files.items():
            try:
                storage.check_relpath(rel, where)
            except storage.StorageError as exc:
                raise ArtifactError(str(exc)) from None
            if rel == MANIFEST or not isinstance(meta, dict) or not {"sha256", "size"} <= set(meta):
                raise ArtifactError(
                    f"{where}: manifest.json entry {rel!r} is malformed (needs sha256 and size); "
                    "re-create the artifact"
                )
        return manifest


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
        rel = str(path.relative_to(local))
        if path.is_file() and rel != MANIFEST:  # a nested artifact's manifest is one of the files
            files[rel] = {"sha256": storage.sha256_file(path), "size": path.stat().st_size}
    return files


VERIFIED_MARKER = ".verified"
"""Written beside the manifest in the local copy of an S3 artifact once it is verified."""


def rebuild_hint(where: str) -> str:
    """What to do about a corrupt or tampered artifact."""
    return (
        f"delete {where} and re-run the command that wrote it (`puzzle run` then rebuilds it and every "
        "phase after it; `puzzle run --force STAGE` does both for the stage that wrote it)"
    )


def _unlisted_message(unlisted: list[str], where: str) -> str:
    one = len(unlisted) == 1
    names = ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else "")
    return (
        f"{names} {'is' if one else 'are'} not listed in manifest.json (added after the artifact was "
        f"written, so never checked; refused rather than used): remove {'it' if one else 'them'}, or "
        f"{rebuild_hint(where)}"
    )


def _present_files(local: Path) -> list[str]:
    """Every file (and symlink) below ``local``, relative, without following symlinked folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(local):
        base = Path(dirpath)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            found.append((base / name).relative_to(local).as_posix())
    return sorted(found)


def verify_local(local: Path, manifest: Manifest, where: str) -> None:
    """Check that the artifact holds exactly the files its manifest lists, each a regular file
    inside it (no symlink) with the listed size and SHA-256."""
    try:
        paths = {rel: storage.local_path_in(local, rel, where) for rel in manifest.files}
    except storage.StorageError as exc:
        raise ArtifactError(str(exc)) from None
    ours = (MANIFEST, VERIFIED_MARKER)
    unlisted = [rel for rel in _present_files(local) if rel not in manifest.files and rel not in ours]
    if unlisted:
        raise ArtifactError(f"{where}: {_unlisted_message(unlisted, where)}")
    for rel, meta in manifest.files.items():
        path = paths[rel]
        if not path.is_file():
            raise ArtifactError(
                f"{where}: file {rel} listed in manifest.json is missing; {rebuild_hint(where)}"
            )
        if path.stat().st_size != meta["size"]:
            raise ArtifactError(
                f"{where}: {rel} is {path.stat().st_size} bytes, manifest says {meta['size']} "
                f"(truncated or corrupt); {rebuild_hint(where)}"
            )
        if storage.sha256_file(path) != meta["sha256"]:
            raise ArtifactError(f"{where}: checksum mismatch for {rel} (corrupt); {rebuild_hint(where)}")


def materialize(uri: str, kind: str | tuple[str, ...] | None = None) -> Path:
    """A verified local directory holding the artifact at ``uri`` (downloaded once when on S3).

    Every file name is checked before anything is read or written (:func:`storage.check_relpath`:
    no absolute path, ``..``, backslash; no symlink on the way), and an artifact holding a file
    its manifest does not list is refused.
    """
    manifest = require_manifest(uri, kind) if kind else read_manifest(uri)
    if manifest is None:
        raise ArtifactError(f"no artifact at {uri} (no manifest.json)")
    if not storage.is_s3(uri):
        local = Path(uri)
        verify_local(local, manifest, uri)
        return local
    local = storage.cache_dir_for(f"{uri}#{manifest.content_hash}", "artifacts")
    marker = local / VERIFIED_MARKER
    if marker.is_file() and not marker.is_symlink() and marker.read_text() == manifest.content_hash:
        return local
    listed = set(manifest.files) | {MANIFEST}
    unlisted = [rel for rel in storage.list_files(uri) if rel not in listed]
    if unlisted:
        raise ArtifactError(f"{uri}: {_unlisted_message(unlisted, uri)}")
    # An unverified copy (an interrupted download, or anything else) is never trusted: start afresh.
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True, exist_ok=True)
    for rel in manifest.files:
        storage.download_file(storage.join(uri, rel), storage.local_path_in(local, rel, uri))
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
    if want != have:
        return None
    if not storage.is_s3(out):
        # Up to date by its manifest: only when its files are still what the manifest says.
        try:
            verify_local(Path(out), existing, out)
        except ArtifactError as exc:
            raise ArtifactError(f"the {kind} output is up to date by its manifest, but {exc}") from None
    return existing


def check_output(out: str, kind: str | tuple[str, ...]) -> None:
    """The publish rule, checked before any work: ``out`` may be replaced only when it does not
    exist, is an empty directory or holds an artifact of the same ``kind``. A file, a directory
    that is not an artifact (a user's folder) or an artifact of another kind is refused, and
    nothing is changed. (An ``s3://`` output is never deleted unless it holds a manifest.)"""
    if storage.is_s3(out):
        return
    path = Path(out)
    if not path.exists() and not path.is_symlink():
        if path.parent.exists() and not path.parent.is_dir():
            raise ArtifactError(
                f"output {out}: {path.parent} is a file, not a directory; choose another output"
            )
        return
    if path.is_symlink() or not path.is_dir():
        raise ArtifactError(
            f"output {out} is an existing {'symbolic link' if path.is_symlink() else 'file'}, not an "
            "artifact directory; nothing was changed: choose another output (--out), or remove it yourself"
        )
    if not (path / MANIFEST).is_file():
        if any(path.iterdir()):
            raise ArtifactError(
                f"output {out} is an existing directory that is not a puzzle artifact (no manifest.json); "
                "publishing there would replace everything in it, so nothing was changed: choose a new or "
                "empty output (--out), or remove the folder yourself"
            )
        return
    try:
        existing = read_manifest(out)
    except ArtifactError:
        return  # our artifact, with a damaged manifest: replaceable
    kinds = (kind,) if isinstance(kind, str) else kind
    if existing is not None and existing.kind not in kinds:
        raise ArtifactError(
            f"output {out} holds a {existing.kind!r} artifact, and this phase writes a "
            f"{'/'.join(kinds)!r} one; nothing was changed: choose another output (--out), or delete that "
            "artifact yourself"
        )


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
    check_output(out, kind)
    params = _canonical(dict(parameters))
    if not force:
        current = is_current(out, kind, inputs, params)
        if current is not None:
            log.info("%s: %s is up to date (same inputs and parameters), skipping", kind, out)
            return current
    input_kinds = dict(input_kinds or {})
    input_refs: dict[str, dict[str, str]] = {}
    local_inputs: dict[str, Path] = {}
    verified: list[Path] = []  # local input artifacts whose files were just checked
    for name, uri in inputs.items():
        if name in input_kinds:
            require_manifest(uri, input_kinds[name])
        input_refs[name] = {"uri": uri, "hash": fingerprint(uri)}
        if materialize_inputs and read_manifest(uri) is not None:
            local_inputs[name] = materialize(uri)
            if not storage.is_s3(uri):
                verified.append(local_inputs[name])
        else:
            local_inputs[name] = Path(uri)
    staging = work_dir_for(out)
    stamp = staging / ".work" / "request.json"
    request = {"kind": kind, "inputs": input_refs, "parameters": params}
    if stamp.exists() and json.loads(stamp.read_text()) != request:
        log.info("%s: staging %s was for other inputs/parameters; starting afresh", kind, staging)
        shutil.rmtree(staging)
        staging.mkdir(parents=True)
    resuming = stamp.exists()
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(request, sort_keys=True))
    log.info("%s: building %s", kind, out)
    try:
        summary = body(staging, local_inputs) or {}
    except BaseException as exc:
        _drop_staging_after_failure(staging, fresh=not resuming, input_error=isinstance(exc, PuzzleError))
        raise
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
    if not storage.is_s3(out):
        link_duplicates(staging, manifest.files, verified)
    publish(staging, out, manifest)
    return manifest


def link_duplicates(staging: Path, files: Mapping[str, Mapping[str, Any]], sources: list[Path]) -> int:
    """Replace every file of ``staging`` that is identical (size and SHA-256) to a file of one of the
    local artifacts ``sources`` by a hard link to that file, so an output that repeats an input's file
    (an export of a child, a tokenizer) takes no second copy on disk. Artifacts are never modified in
    place (a rebuilt one is a new directory), so the two stay equal; where a link cannot be made
    (another file system), the copy stays. Returns the bytes saved."""
    known: dict[tuple[str, int], Path] = {}
    for source in sources:
        manifest = read_manifest(str(source))
        for rel, meta in (manifest.files if manifest is not None else {}).items():
            known.setdefault((meta["sha256"], int(meta["size"])), source / rel)
    saved = 0
    for rel, entry in files.items():
        original = known.get((entry["sha256"], int(entry["size"])))
        path = staging / rel
        if original is None or original.is_symlink() or not original.is_file() or path.is_symlink():
            continue
        if os.path.samefile(original, path):
            continue
        link = path.with_name(f".{path.name}.link")
        try:
            link.unlink(missing_ok=True)
            os.link(original, link)
            os.replace(link, path)
        except OSError as exc:
            link.unlink(missing_ok=True)
            log.debug("kept a copy of %s (no hard link to %s: %s)", path, original, exc)
            continue
        saved += int(entry["size"])
    if saved:
        log.info("%s: %.1f MB identical to its inputs' files, hard-linked", staging, saved / 1e6)
    return saved


def steps_dir(out: str, staging: Path, *, keep: bool, work: str | None = None) -> str:
    """Where a phase writes the artifacts it makes on its way to ``out`` (candidates, a realized
    child before GKD): ``work`` (default ``<out>-steps``) when they are kept, else ``.work/steps`` of
    its staging directory, which survives an interruption and is removed when ``out`` is published."""
    if keep:
        return work or f"{out.rstrip('/')}-steps"
    return str(staging / ".work" / "steps")


def adopt(source: str, staging: Path, *, skip: tuple[str, ...] = ()) -> Manifest:
    """The files of the artifact at ``source`` (its manifest and ``skip`` aside) placed into
    ``staging``, a phase's staging directory, as hard links where possible (else copies), and
    ``source``'s manifest: a phase whose output is one of its working artifacts (under
    ``staging/.work``, removed when the output is published) or a kept step takes no second copy.
    A file the phase then changes must be written anew, not in place (it may be ``source``'s too):
    name it in ``skip``."""
    manifest = read_manifest(source)
    if manifest is None:
        raise ArtifactError(f"no artifact at {source} (no manifest.json)")
    local = materialize(source)
    for rel in manifest.files:
        if rel in skip:
            continue
        src, dst = storage.local_path_in(local, rel, source), staging / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return manifest


def _drop_staging_after_failure(staging: Path, *, fresh: bool, input_error: bool) -> None:
    """After a failed body: remove a staging directory that holds nothing to resume from. It is
    kept when it holds checkpoints (files under ``.work/`` besides the request stamp), or when it
    came from an earlier attempt and the failure is not an input error (a crash, an interrupt)."""
    stamp = Path(".work") / "request.json"
    files = [p.relative_to(staging) for p in staging.rglob("*") if p.is_file()]
    checkpoints = [f for f in files if f.parts[0] == ".work" and f != stamp]
    if not checkpoints and (input_error or fresh or files == [stamp]):
        shutil.rmtree(staging, ignore_errors=True)


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
    check_output(out, manifest.kind)  # again: the folder may have appeared while the phase ran
    (staging / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)


def copy(source: str, out: str, kind: str) -> Manifest:
    """``source`` (an artifact of ``kind``) republished at ``out`` with the same kind and summary: a
    phase whose result is an earlier artifact as it stands (resumes like any phase)."""
    manifest = require_manifest(source, kind)

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        ours = shutil.ignore_patterns(MANIFEST, VERIFIED_MARKER)
        shutil.copytree(local["source"], staging, dirs_exist_ok=True, ignore=ours)
        return dict(manifest.summary)

    return run_phase(manifest.kind, out, {"source": source}, {}, body)


def delete_if_exists(uri: str) -> None:
    """Remove an artifact (and its staging directory) so that the next run rebuilds it."""
    if storage.exists(storage.join(uri, MANIFEST)) or (not storage.is_s3(uri) and Path(uri).exists()):
        storage.delete_tree(uri)
    if not storage.is_s3(uri):
        shutil.rmtree(f"{uri.rstrip('/')}.partial", ignore_errors=True)
