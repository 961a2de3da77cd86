"""The one storage layer: local paths and ``s3://`` URIs.

Every phase reads and writes through this module. Writes are atomic (a local file is written
beside its target and renamed; an S3 object appears whole when its upload completes) and every
artifact file carries a SHA-256 checksum in its manifest that is verified when it is read back
(see :mod:`puzzle.io.artifacts`).

S3 endpoint and credentials come from the standard AWS variables: ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
_CHUNK = 8 * 1024 * 1024


class StorageError(PuzzleError, RuntimeError):
    """A storage operation failed; the message says where (endpoint, bucket, key) and what to do."""


def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith(S3_SCHEME)


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    base = str(uri)
    if is_s3(base):
        out = base.rstrip("/")
        for part in parts:
            out = f"{out}/{part.strip('/')}"
        return out
    return str(Path(base, *parts))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/part`` -> ``("bucket", "key/part")``."""
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    rest = uri[len(S3_SCHEME) :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"S3 URI {uri!r} has no bucket: write it as s3://BUCKET/PREFIX")
    return bucket, key


def s3_endpoint() -> str:
    return (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "https://s3.amazonaws.com"
    )


@lru_cache(maxsize=8)
def _client_for(endpoint: str, key_id: str | None, secret: str | None, region: str) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=region
    )
    return session.client(
        "s3",
        endpoint_url=None if endpoint == "https://s3.amazonaws.com" else endpoint,
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"},
        ),
    )


def s3_client() -> Any:
    """A boto3 S3 client built from the standard AWS environment variables."""
    return _client_for(
        s3_endpoint(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),
        os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    )


def _s3_error(exc: Exception, uri: str, action: str) -> StorageError:
    """Turn a boto error into a message that names the endpoint, the bucket and the fix."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = s3_endpoint()
    try:
        bucket, key = split_s3(uri)
    except StorageError:
        bucket, key = "?", uri
    if isinstance(exc, EndpointConnectionError) or "Could not connect" in str(exc):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint} to {action} s3://{bucket}/{key}: check "
            "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and that the server is running"
        )
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"no S3 credentials to {action} s3://{bucket}/{key} at {endpoint}: set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"}:
            return StorageError(
                f"S3 endpoint {endpoint} rejected the credentials for bucket {bucket!r} ({code}) "
                f"while trying to {action} s3://{bucket}/{key}: check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            )
        if code in {"NoSuchBucket"}:
            return StorageError(
                f"bucket {bucket!r} does not exist at S3 endpoint {endpoint}: create it or fix the URI"
            )
        if code in {"NoSuchKey", "404", "NotFound"}:
            return StorageError(f"s3://{bucket}/{key} not found at {endpoint}")
        return StorageError(
            f"S3 error {code} at {endpoint} while trying to {action} s3://{bucket}/{key}: {exc}"
        )
    return StorageError(f"S3 failure at {endpoint} while trying to {action} s3://{bucket}/{key}: {exc}")


def check_access(uri: str, *, write: bool = False) -> None:
    """Fail early, with a clear message, when ``uri`` cannot be read (or written)."""
    if not is_s3(uri):
        path = Path(uri)
        probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
        if write and not os.access(probe, os.W_OK):
            raise StorageError(f"cannot write under {uri}: {probe} is not writable")
        return
    bucket, _ = split_s3(uri)
    try:
        s3_client().head_bucket(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 - translated into a StorageError with the fix
        raise _s3_error(exc, uri, "access") from exc


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    from botocore.exceptions import ClientError

    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise _s3_error(exc, uri, "read") from exc
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(exc, uri, "read") from exc


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"{uri} does not exist") from exc
    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(exc, uri, "read") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: readers see the old content or the new, never a part."""
    if not is_s3(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    bucket, key = split_s3(uri)
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(exc, uri, "write") from exc


def read_json(uri: str) -> Any:
    raw = read_bytes(uri)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StorageError(f"{uri} is not valid JSON ({exc}); the file is corrupt: re-create it") from exc


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _unsafe_reason(rel: str) -> str | None:
    if not rel:
        return "empty"
    if "\x00" in rel:
        return "a NUL byte"
    if "\\" in rel:
        return "a backslash"
    if rel.startswith("/"):
        return "an absolute path"
    if len(rel) > 1 and rel[0].isalpha() and rel[1] == ":":
        return "a drive letter"
    parts = rel.split("/")
    if ".." in parts:
        return "a '..' component"
    if "" in parts or "." in parts:
        return "an empty or '.' component"
    return None


def check_relpath(rel: str, where: str) -> str:
    """``rel`` when it is a safe relative file name inside an artifact or prefix, else a StorageError.

    The one path-safety rule of every reader: a file name that comes from a manifest or an S3
    listing must be a plain relative path (``/``-separated, no absolute path, drive letter,
    backslash, ``..``, ``.`` or empty component), so joining it onto a local directory can never
    leave that directory.
    """
    reason = _unsafe_reason(rel) if isinstance(rel, str) else "not a string"
    if reason is not None:
        raise StorageError(
            f"{where}: refusing the file name {rel!r} ({reason}): an artifact's files must be relative "
            "paths inside it; it was not written by puzzle or was tampered with, re-create it"
        )
    return rel


def local_path_in(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` for a safe ``rel`` (:func:`check_relpath`) whose existing components below
    ``root`` are no symlinks, so reading or writing it stays inside ``root``."""
    check_relpath(rel, where)
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise StorageError(
                f"{where}: refusing {rel!r}: {path} is a symbolic link (it could point outside the "
                "artifact); remove it and re-create the artifact"
            )
    return path


def list_objects(uri: str) -> list[tuple[str, int, str]]:
    """``(relative path, size, ETag)`` of every object below an S3 prefix (directory markers
    left out); the ETag and size identify an object's content."""
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    out: list[tuple[str, int, str]] = []
    try:
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if rel and not (rel.endswith("/") and int(obj.get("Size", 0)) == 0):
                    out.append((rel, int(obj.get("Size", 0)), str(obj.get("ETag", ""))))
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(exc, uri, "list") from exc
    return sorted(out)


def head(uri: str) -> tuple[int, str] | None:
    """``(size, ETag)`` of the S3 object at ``uri``, or None when there is none."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        meta = s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise _s3_error(exc, uri, "read") from exc
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(exc, uri, "read") from exc
    return int(meta.get("ContentLength", 0)), str(meta.get("ETag", ""))


def list_files(uri: str) -> list[str]:
    """Relative paths of every file below a local directory or an S3 prefix."""
    if not is_s3(uri):
        root = Path(uri)
        if not root.is_dir():
            return []
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    out: list[str] = []
    try:
        paginator = s3_client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out.append(obj["Key"][len(prefix) :])
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(exc, uri, "list") from exc
    return sorted(p for p in out if p)


def upload_file(local: str | os.PathLike[str], uri: str) -> None:
    if not is_s3(uri):
        dest = Path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
        return
    bucket, key = split_s3(uri)
    try:
        s3_client().upload_file(str(local), bucket, key)
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(exc, uri, "write") from exc


def download_file(uri: str, local: str | os.PathLike[str]) -> None:
    dest = Path(local)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if not is_s3(uri):
        shutil.copyfile(uri, tmp)
    else:
        bucket, key = split_s3(uri)
        try:
            s3_client().download_file(bucket, key, str(tmp))
        except Exception as exc:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            raise _s3_error(exc, uri, "read") from exc
    os.replace(tmp, dest)


def delete_tree(uri: str) -> None:
    if not is_s3(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/"
    client = s3_client()
    try:
        keys = [prefix + rel for rel in list_files(uri)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(exc, uri, "delete") from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    """Where downloaded S3 artifacts and S3-bound staging directories live."""
    root = Path(os.environ.get("PUZZLE_CACHE_DIR", Path.home() / ".cache" / "puzzle"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir_for(uri: str, purpose: str) -> Path:
    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    path = cache_root() / purpose / name
    path.mkdir(parents=True, exist_ok=True)
    return path


COMPLETE_SUFFIX = ".complete"


def _content_keyed_dir(uri: str, purpose: str, objects: list[tuple[str, int, str]]) -> tuple[Path, Path]:
    """``(directory, completion marker)`` of the local copy of ``objects`` (name, size, ETag) of
    ``uri``: keyed by the URI *and* the objects, so changed objects get a new copy."""
    base = cache_dir_for(uri, purpose)
    key = hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16]
    return base / key, base / f"{key}{COMPLETE_SUFFIX}"


def _drop_other_copies(keep: Path) -> None:
    """Remove older copies of the same URI (other content keys) once ``keep`` is complete."""
    for entry in keep.parent.iterdir():
        if entry.name in (keep.name, f"{keep.name}{COMPLETE_SUFFIX}"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def download_prefix(
    uri: str, purpose: str, keep: Callable[[str], bool] | None = None
) -> tuple[Path, list[str]]:
    """A local copy of the objects below the S3 prefix ``uri`` (those whose relative name ``keep``
    accepts), and their relative names; ``([], ...)`` names when there is none.

    The cache is keyed by content: the objects' names, sizes and ETags, so a prefix whose objects
    were replaced in place is downloaded again (older copies of the prefix are then removed). Every
    name is checked by :func:`check_relpath` before anything is written (S3 keys may hold ``..``).
    """
    objects = [o for o in list_objects(uri) if keep is None or keep(o[0])]
    for rel, _, _ in objects:
        check_relpath(rel, uri)
    names = [rel for rel, _, _ in objects]
    if not objects:
        return cache_dir_for(uri, purpose), names
    local, marker = _content_keyed_dir(uri, purpose, objects)
    if not marker.is_file():
        for rel, size, _ in objects:
            target = local_path_in(local, rel, uri)
            if not (target.is_file() and target.stat().st_size == size):
                download_file(join(uri, rel), target)
        marker.write_text(uri)
        _drop_other_copies(local)
    return local, names


def download_object(uri: str, purpose: str) -> Path | None:
    """A local copy of the one S3 object at ``uri`` (None when there is none), cached by its
    size and ETag like :func:`download_prefix`."""
    meta = head(uri)
    if meta is None:
        return None
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    check_relpath(name, uri)
    local, marker = _content_keyed_dir(uri, purpose, [(name, *meta)])
    target = local_path_in(local, name, uri)
    if not marker.is_file():
        download_file(uri, target)
        marker.write_text(uri)
        _drop_other_copies(local)
    return target


@contextmanager
def temporary_dir(prefix: str = "puzzle-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
