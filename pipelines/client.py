"""Compile, upload, submit and schedule the Puzzle pipeline on Kubeflow Pipelines.

``puzzle pipeline ...`` (:mod:`pipelines.commands`) calls these; so can other tools. Every
argument is checked before the KFP API is contacted (the config file or profile, the cron
expression, the serving prefix), and an unreachable API fails within seconds with the URL in
the message, instead of the KFP client's own retry loop.

Authentication: inside a cluster, the pod's service-account token is used when present:
``--token-path`` / ``KF_PIPELINES_SA_TOKEN_PATH`` (a projected token with audience
``pipelines.kubeflow.org``, what multi-user Kubeflow expects), else
``/var/run/secrets/kubeflow/pipelines/token``, else the pod's default
``/var/run/secrets/kubernetes.io/serviceaccount/token``. The token file is re-read on every
request, so Kubernetes' rotation is picked up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle import __version__
from puzzle.config import ConfigError, RunConfig, load_config
from puzzle.errors import PuzzleError

log = logging.getLogger(__name__)

HOST_ENV = "KF_PIPELINES_ENDPOINT"
NAMESPACE_ENV = "PUZZLE_KFP_NAMESPACE"
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
PROFILES_ENV = "PUZZLE_PROFILES_DIR"
TOKEN_PATHS = (
    "/var/run/secrets/kubeflow/pipelines/token",
    "/var/run/secrets/kubernetes.io/serviceaccount/token",
)
DEFAULT_PROFILES_DIR = "/etc/puzzle/profiles"
DEFAULT_PIPELINE_NAME = "puzzle"
HEALTHZ = "/apis/v2beta1/healthz"


class PipelineCLIError(PuzzleError, ValueError):
    """Bad arguments for compile/upload/submit/schedule, or an unreachable KFP API."""


# --------------------------------------------------------------------------- arguments


def load_run_config(
    config: str | None = None,
    profile: str | None = None,
    *,
    profiles_dir: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RunConfig:
    """The run configuration: a config file, or a named profile (``<profiles_dir>/<name>.yaml``).

    Neither: the embedded default. Storage is not checked here: the pods, not this machine,
    read the parent and write the outputs.
    """
    if config and profile:
        raise PipelineCLIError("give --config or --profile, not both")
    if profile:
        directory = Path(profiles_dir or os.environ.get(PROFILES_ENV) or DEFAULT_PROFILES_DIR)
        known = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
        if profile not in known:
            where = f"in {directory}" if directory.is_dir() else f"({directory} does not exist)"
            raise PipelineCLIError(
                f"unknown profile {profile!r} {where}; known profiles: {', '.join(known) or 'none'} "
                f"(set --profiles-dir or ${PROFILES_ENV})"
            )
        config = str(directory / f"{profile}.yaml")
    try:
        return load_config(config, list(overrides), check_access=False)
    except ConfigError as exc:
        raise PipelineCLIError(f"{config or 'the embedded default config'}: {exc}") from exc


_CRON_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("seconds", 0, 59, {}),
    ("minutes", 0, 59, {}),
    ("hours", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    ),
    ("day of week", 0, 6, {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}),
)
_CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_CRON_EVERY = re.compile(r"^@every\s+(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")


def validate_cron(expression: str) -> str:
    """A KFP cron expression: six fields, seconds first (``0 0 3 * * 0`` = Sundays 03:00:00).

    Also accepts the descriptors KFP's scheduler knows (``@daily``, ``@every 6h``...).
    """
    text = " ".join(str(expression).split())
    if text in _CRON_DESCRIPTORS or _CRON_EVERY.match(text):
        return text
    fields = text.split(" ") if text else []
    if len(fields) != 6:
        hint = f" (a five-field cron? prepend the seconds: '0 {text}')" if len(fields) == 5 else ""
        raise PipelineCLIError(
            f"cron {expression!r} has {len(fields)} fields; KFP needs six, seconds first: "
            f"'SEC MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK', e.g. '0 0 3 * * 0'{hint}"
        )
    for value, (name, low, high, names) in zip(fields, _CRON_FIELDS):
        for part in value.split(","):
            _check_cron_part(part, name, low, high, names, expression)
    return text


def _check_cron_part(
    part: str, name: str, low: int, high: int, names: dict[str, int], expression: str
) -> None:
    def bad(why: str) -> PipelineCLIError:
        return PipelineCLIError(f"cron {expression!r}: {name} field {part!r} {why}")

    def number(token: str) -> int:
        token_upper = token.upper()
        if token_upper in names:
            return names[token_upper]
        if not token.isdigit():
            raise bad(f"is not a number{' or a name' if names else ''}")
        value = int(token)
        if not low <= value <= high:
            raise bad(f"is out of range {low}-{high}")
        return value

    base, sep, step = part.partition("/")
    if sep and (not step.isdigit() or int(step) == 0):
        raise bad("has a step that is not a positive integer")
    if base in ("*", "?"):
        if base == "?" and name not in ("day of month", "day of week"):
            raise bad("uses '?', allowed only for day of month or day of week")
        return
    first, dash, last = base.partition("-")
    start = number(first)
    if dash and number(last) < start:
        raise bad("is a descending range")


def serving_uri_for(uri: str) -> str:
    if uri and not uri.startswith("s3://"):
        raise PipelineCLIError(
            f"--serving-uri must be s3://bucket/prefix (what serving engines read), got {uri!r}"
        )
    return uri


# --------------------------------------------------------------------------- connection


def token_path(explicit: str | None = None) -> str | None:
    """The service-account token to authenticate with, when running in a pod (or given)."""
    if explicit:
        if not Path(explicit).is_file():
            raise PipelineCLIError(f"--token-path {explicit} does not exist")
        return explicit
    from_env = os.environ.get(TOKEN_PATH_ENV)
    for candidate in ([from_env] if from_env else []) + list(TOKEN_PATHS):
        if Path(candidate).is_file():
            return candidate
    return None


def check_reachable(host: str, timeout: float = 10.0) -> None:
    """Fail fast, naming the URL, when nothing answers at the KFP API (any HTTP answer will do)."""
    if not host:
        raise PipelineCLIError(
            f"no KFP API endpoint: pass --host or set ${HOST_ENV} (e.g. http://ml-pipeline.kubeflow:8888)"
        )
    if not host.startswith(("http://", "https://")):
        raise PipelineCLIError(f"--host must be an http(s):// URL of the KFP API, got {host!r}")
    url = host.rstrip("/") + HEALTHZ
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (401/403/404 are the client's business)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PipelineCLIError(
            f"KFP API at {host} is not reachable ({reason}): check --host / ${HOST_ENV}, the network path "
            "(port-forward: kubectl -n kubeflow port-forward svc/ml-pipeline 8888:8888) and the namespace"
        ) from exc


def connect(host: str | None, *, namespace: str | None = None, token: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host`` (checked to be reachable), authenticated by the pod's token."""
    host = host or os.environ.get(HOST_ENV) or ""
    check_reachable(host)
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    path = token_path(token)
    kwargs: dict[str, Any] = {"host": host}
    if path:
        log.info("authenticating to %s with the service-account token %s", host, path)
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=path)
    if namespace:
        kwargs["namespace"] = namespace
    return kfp.Client(**kwargs)


# --------------------------------------------------------------------------- operations


def package_version(package: str | Path) -> str:
    """A version name that changes exactly when the compiled pipeline does."""
    digest = hashlib.sha256(Path(package).read_bytes()).hexdigest()[:12]
    return f"{__version__}-{digest}"


def _check_package(package: str | Path) -> Path:
    path = Path(package)
    if path.is_file():
        return path
    raise PipelineCLIError(f"pipeline package {path} does not exist: run `puzzle pipeline compile` first")


def check_gkd_image(config: RunConfig, package: str | Path | None) -> None:
    """``gkd.backend: nemo`` needs a package whose GKD step runs the puzzle-nemo image (and the
    default package's does not): refused before anything is submitted."""
    if package is None:
        return
    import yaml

    from components.images import NEMO_IMAGE, image

    path = _check_package(package)
    spec = next(yaml.safe_load_all(path.read_text()))
    used = spec.get("deploymentSpec", {}).get("executors", {}).get("exec-gkd", {}).get("container", {})
    used = used.get("image")
    if config.gkd.backend == "nemo" and used != image(NEMO_IMAGE):
        raise PipelineCLIError(
            f"gkd.backend is 'nemo' but the GKD step of {path} runs {used}: compile a NeMo pipeline with "
            "`puzzle pipeline compile --gkd-backend nemo --out pipelines/puzzle_pipeline_nemo.yaml` and "
            "pass --package pipelines/puzzle_pipeline_nemo.yaml"
        )


@dataclass(frozen=True)
class Upload:
    pipeline_id: str
    version_id: str
    version: str
    created: bool


def upload(
    client: Any, package: str | Path, *, name: str = DEFAULT_PIPELINE_NAME, version: str | None = None
) -> Upload:
    """Upload ``package`` as version ``version`` of pipeline ``name``; an existing version is kept."""
    path = _check_package(package)
    version = version or package_version(path)
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        created = client.upload_pipeline(str(path), pipeline_name=name, description=_description())
        pipeline_id = created.pipeline_id
        log.info("created pipeline %s (%s)", name, pipeline_id)
    existing = _find_version(client, pipeline_id, version)
    if existing is not None:
        return Upload(pipeline_id, existing.pipeline_version_id, version, created=False)
    uploaded = client.upload_pipeline_version(
        str(path), pipeline_version_name=version, pipeline_id=pipeline_id
    )
    return Upload(pipeline_id, uploaded.pipeline_version_id, version, created=True)


def _description() -> str:
    return "Puzzle: distillation-based NAS that compresses a parent LLM for a target GPU (puzzle-kubeflow)."


def _by_name(name: str) -> str:
    import json

    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _find_version(client: Any, pipeline_id: str, version: str) -> Any | None:
    response = client.list_pipeline_versions(pipeline_id, page_size=100, filter=_by_name(version))
    versions = [v for v in (response.pipeline_versions or []) if v.display_name == version]
    return versions[0] if versions else None


def latest_version(client: Any, name: str) -> tuple[str, str]:
    """(pipeline id, id of its newest version) of an uploaded pipeline."""
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        raise PipelineCLIError(
            f"no pipeline named {name!r} in KFP: run `puzzle pipeline upload --name {name}` first"
        )
    response = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
    if not response.pipeline_versions:
        raise PipelineCLIError(
            f"pipeline {name!r} has no version: run `puzzle pipeline upload --name {name}`"
        )
    return pipeline_id, response.pipeline_versions[0].pipeline_version_id


def pipeline_root(config: RunConfig) -> str | None:
    """The run's pipeline root: the config's ``output`` when it is on S3 (else KFP's default)."""
    return config.output if config.output.startswith("s3://") else None


def submit(
    client: Any,
    config: RunConfig,
    arguments: dict[str, Any],
    *,
    package: str | Path,
    experiment: str,
    namespace: str | None = None,
    run_name: str | None = None,
    service_account: str | None = None,
) -> str:
    """Start one run of the compiled pipeline; returns its run id."""
    path = _check_package(package)
    name = run_name or f"puzzle-{config.digest}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = client.create_run_from_pipeline_package(
        str(path),
        arguments=arguments,
        run_name=name,
        experiment_name=experiment,
        namespace=namespace,
        pipeline_root=pipeline_root(config),
        service_account=service_account,
    )
    return str(result.run_id)


@dataclass(frozen=True)
class Schedule:
    recurring_run_id: str
    action: str  # "created" | "updated" | "unchanged"


def schedule(
    client: Any,
    config: RunConfig,
    arguments: dict[str, Any],
    *,
    name: str,
    cron: str,
    experiment: str,
    pipeline_id: str | None = None,
    version_id: str | None = None,
    package: str | Path | None = None,
    namespace: str | None = None,
    max_concurrency: int = 1,
    no_catchup: bool = True,
    service_account: str | None = None,
) -> Schedule:
    """Create the recurring run ``name``, or update it (by name) when anything about it changed."""
    cron = validate_cron(cron)
    if max_concurrency < 1:
        raise PipelineCLIError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    if package is None and not (pipeline_id and version_id):
        raise PipelineCLIError("schedule needs an uploaded pipeline (--pipeline NAME) or a package")
    exp = client.create_experiment(name=experiment, namespace=namespace)
    pipeline = version_id if package is None else package_version(_check_package(package))
    description = f"Puzzle recurring run: config {config.digest}, pipeline version {pipeline}"
    wanted = {
        "description": description,
        "cron": cron,
        "max_concurrency": int(max_concurrency),
        "no_catchup": bool(no_catchup),
        "parameters": arguments,
        "pipeline_version_id": version_id,
        "pipeline_root": pipeline_root(config),
    }
    existing = _find_recurring_run(client, exp.experiment_id, name, namespace)
    if existing is not None:
        if _recurring_run_settings(existing, package is not None) == wanted:
            return Schedule(existing.recurring_run_id, "unchanged")
        # KFP has no update call for recurring runs: replace it under the same name.
        client.delete_recurring_run(existing.recurring_run_id)
    created = client.create_recurring_run(
        experiment_id=exp.experiment_id,
        job_name=name,
        description=description,
        cron_expression=cron,
        max_concurrency=int(max_concurrency),
        no_catchup=bool(no_catchup),
        params=arguments,
        pipeline_package_path=str(_check_package(package)) if package is not None else None,
        pipeline_id=pipeline_id if package is None else None,
        version_id=version_id if package is None else None,
        pipeline_root=pipeline_root(config),
        service_account=service_account,
    )
    return Schedule(created.recurring_run_id, "updated" if existing is not None else "created")


def _find_recurring_run(client: Any, experiment_id: str, name: str, namespace: str | None) -> Any | None:
    response = client.list_recurring_runs(
        experiment_id=experiment_id, namespace=namespace, page_size=100, filter=_by_name(name)
    )
    runs = [r for r in (response.recurring_runs or []) if r.display_name == name]
    if len(runs) > 1:
        raise PipelineCLIError(
            f"{len(runs)} recurring runs are named {name!r}; delete the extra ones in the KFP UI"
        )
    return runs[0] if runs else None


def _recurring_run_settings(run: Any, from_package: bool) -> dict[str, Any]:
    trigger = getattr(run, "trigger", None)
    cron_schedule = getattr(trigger, "cron_schedule", None)
    runtime = getattr(run, "runtime_config", None)
    reference = getattr(run, "pipeline_version_reference", None)
    return {
        "description": getattr(run, "description", None),
        "cron": getattr(cron_schedule, "cron", None),
        "max_concurrency": int(getattr(run, "max_concurrency", 0) or 0),
        "no_catchup": bool(getattr(run, "no_catchup", False)),
        "parameters": dict(getattr(runtime, "parameters", None) or {}),
        "pipeline_version_id": None if from_package else getattr(reference, "pipeline_version_id", None),
        "pipeline_root": getattr(runtime, "pipeline_root", None) or None,
    }
