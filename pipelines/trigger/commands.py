"""``puzzle trigger``: the service that starts Puzzle runs from the MLflow UI (webhooks).

The service lives in ``pipelines.trigger``; it is imported only when a sub-command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from collections.abc import Callable
from typing import Any, NamedTuple, overload


@overload
def _env(name: str) -> str | None: ...
@overload
def _env(name: str, default: str) -> str: ...
def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"PUZZLE_TRIGGER_{name}", default)


def _add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow server URL (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--secret-file",
        default=_env("SECRET_FILE"),
        help="file holding the webhook's HMAC secret (default: $PUZZLE_TRIGGER_SECRET_FILE, "
        "else the secret itself in $PUZZLE_TRIGGER_SECRET); never passed on the command line",
    )


class Option(NamedTuple):
    """A service option: ``--flag``, its environment variable (``PUZZLE_TRIGGER_<env>``) and default."""

    flag: str
    env: str
    default: str | int | float | None
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None


SERVICE_OPTIONS = (
    Option("--request-tag", "REQUEST_TAG", "puzzle.request", "version tag whose value names the profile"),
    Option("--request-alias", "REQUEST_ALIAS", "puzzle-request", "version alias requesting --alias-profile"),
    Option("--alias-profile", "ALIAS_PROFILE", "default", "profile run for --request-alias"),
    Option("--profiles", "PROFILES", None, "directory of <profile>.yaml (default: only 'default')", "DIR"),
    Option("--child-model", "CHILD_MODEL", "{model}-puzzle", "registered model of the children"),
    Option("--state-db", "STATE_DB", "puzzle-trigger.sqlite", "SQLite file of deliveries and runs"),
    Option("--window", "WINDOW_S", 300.0, "accepted clock difference of a delivery, in seconds"),
    Option("--max-body-bytes", "MAX_BODY_BYTES", 64 * 1024, "largest accepted webhook body"),
    Option("--backend", "BACKEND", "local", "where runs go", choices=("kfp", "local")),
    Option("--work-dir", "WORK_DIR", "./puzzle-trigger-runs", "local backend: each run's folder"),
    Option("--kfp-host", "KFP_HOST", None, "kfp backend: the KFP API endpoint"),
    Option("--kfp-namespace", "KFP_NAMESPACE", None, "kfp backend: the namespace of runs"),
    Option("--kfp-experiment", "KFP_EXPERIMENT", "puzzle", "kfp backend: experiment"),
    Option("--pipeline-package", "PIPELINE_PACKAGE", None, "kfp backend: the compiled pipeline", "YAML"),
    Option("--serving-uri", "SERVING_URI", "", "kfp backend: s3:// prefix the exports are published to"),
    Option("--gpu-product", "GPU_PRODUCT", None, "kfp backend: nvidia.com/gpu.product label to measure on"),
)
"""Every setting of the service, from a flag or ``PUZZLE_TRIGGER_<env>`` (the chart sets the latter)."""


def _add_service_args(parser: argparse.ArgumentParser) -> None:
    _add_connection_args(parser)
    for option in SERVICE_OPTIONS:
        kind: Callable[[str], Any] = type(option.default) if option.default not in (None, "") else str
        raw = _env(option.env)
        default = option.default if raw is None else kind(raw)
        shown = f" (default: {option.default})" if option.default not in (None, "") else ""
        parser.add_argument(
            option.flag,
            type=kind,
            default=default,
            help=option.help + shown,
            metavar=option.metavar,
            choices=option.choices,
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to every profile, e.g. --set gkd.token_budget=1024 (repeatable)",
    )


def _settings(args: argparse.Namespace, *, reconcile_interval: float = 0.0):  # -> TriggerSettings
    from pipelines.trigger.settings import TriggerSettings, secret_from

    return TriggerSettings(
        tracking_uri=args.tracking_uri or "",
        secret=secret_from(_env("SECRET"), args.secret_file),
        request_tag=args.request_tag,
        request_alias=args.request_alias,
        alias_profile=args.alias_profile,
        profiles_dir=args.profiles,
        child_model=args.child_model,
        state_db=args.state_db,
        window_s=args.window,
        max_body_bytes=args.max_body_bytes,
        backend=args.backend,
        reconcile_interval_s=reconcile_interval,
        overrides=tuple(args.overrides),
        work_dir=args.work_dir,
        kfp_host=args.kfp_host,
        kfp_namespace=args.kfp_namespace,
        kfp_experiment=args.kfp_experiment,
        pipeline_package=args.pipeline_package,
        serving_uri=args.serving_uri,
        gpu_product=args.gpu_product,
    )


def _serve(args: argparse.Namespace) -> int:
    from pipelines.trigger import build_service, logs
    from pipelines.trigger.server import TriggerServer

    logs.configure(args.log_level.upper())
    settings = _settings(args, reconcile_interval=args.reconcile_interval)
    server = TriggerServer(build_service(settings), args.host, args.port)
    # Kubernetes stops a pod with SIGTERM: finish the requests in flight, then exit.
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    print(
        f"puzzle trigger: listening on http://{args.host}:{server.port}/webhook (health: /healthz)",
        flush=True,
    )
    server.serve_forever()
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from pipelines.trigger import build_service, logs

    logs.configure("INFO")

    service = build_service(_settings(args))
    for outcome in service.reconcile():
        print(json.dumps(outcome))
    return 0


def _register_webhook(args: argparse.Namespace) -> int:
    from pipelines.trigger.settings import TriggerConfigError, secret_from
    from pipelines.trigger.webhooks import register_webhook
    from puzzle.mlflow.tracking import client_for

    secret = secret_from(_env("SECRET"), args.secret_file)
    if not args.tracking_uri:
        raise TriggerConfigError("--tracking-uri (or MLFLOW_TRACKING_URI) must name the MLflow server")
    if not secret:
        raise TriggerConfigError("no webhook secret: set PUZZLE_TRIGGER_SECRET or --secret-file")
    if not args.url.startswith(("http://", "https://")):
        raise TriggerConfigError(
            f"--url must be the service's http(s) URL ending in /webhook, got {args.url!r}"
        )
    result = register_webhook(client_for(args.tracking_uri), args.url, secret, name=args.name)
    state = "created" if result.created else "updated"
    print(f"webhook {result.name} ({result.webhook_id}) {state}: {result.url}")
    return 0


def _register_parent(args: argparse.Namespace) -> int:
    from puzzle.mlflow import registry

    result = registry.register_parent(args.source, args.name, tracking_uri=args.tracking_uri)
    state = "registered" if result.created else "already registered"
    print(f"{state}: {result.uri} (tag it puzzle.request=<profile> in the MLflow UI to run Puzzle on it)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "trigger",
        help="the service that starts runs from the MLflow UI (webhooks)",
        description=(
            "Start Puzzle runs from the MLflow UI: tag a registered parent model version with "
            "puzzle.request=<profile>; MLflow sends a signed webhook to this service, which submits "
            "the run (Kubeflow Pipelines or locally) and tags the version with the run id and state."
        ),
    )
    commands = parser.add_subparsers(dest="trigger_command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the webhook receiver (POST /webhook, GET /healthz) and the reconcile loop",
        description="Receive MLflow webhooks, verify them, submit requested runs; JSON logs on stderr.",
    )
    _add_service_args(serve)
    serve.add_argument(
        "--host", default=_env("HOST", "0.0.0.0"), help="address to listen on (default: 0.0.0.0)"
    )
    serve.add_argument("--port", type=int, default=int(_env("PORT", "8080")), help="port (default: 8080)")
    serve.add_argument(
        "--reconcile-interval",
        type=float,
        default=float(_env("RECONCILE_INTERVAL_S", "60")),
        help="seconds between reconcile passes, 0 for none (default: 60)",
    )
    serve.add_argument(
        "--log-level", default=_env("LOG_LEVEL", "info"), help="debug, info, warning (default: info)"
    )
    serve.set_defaults(func=_serve)

    reconcile = commands.add_parser(
        "reconcile",
        help="submit every request tag that has no run yet (one pass), print the outcomes",
        description="One reconcile pass: MLflow delivers webhooks once; this catches lost ones.",
    )
    _add_service_args(reconcile)
    reconcile.set_defaults(func=_reconcile)

    hook = commands.add_parser(
        "register-webhook",
        help="create or update the MLflow webhook that calls this service",
        description=(
            "Create the webhook (events model_version_tag.set and model_version_alias.created) or update "
            "the existing one of the same name; safe to run again."
        ),
    )
    _add_connection_args(hook)
    hook.add_argument(
        "--url",
        required=True,
        help="the service's URL as MLflow reaches it, e.g. http://puzzle-trigger:8080/webhook",
    )
    hook.add_argument("--name", default="puzzle-trigger", help="webhook name (default: puzzle-trigger)")
    hook.set_defaults(func=_register_webhook)

    parent = commands.add_parser(
        "register-parent",
        help="register a parent checkpoint as a model version (to be tagged in the UI)",
        description=(
            "Upload a parent checkpoint (a Hugging Face directory or a folder with one .gguf file, local "
            "or s3://) to MLflow as a new version of --name; the same files again return the same version."
        ),
    )
    parent.add_argument("source", help="the checkpoint directory (local path or s3:// prefix)")
    parent.add_argument("--name", required=True, help="registered model name, e.g. smollm2-135m")
    parent.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow server URL (default: $MLFLOW_TRACKING_URI)",
    )
    parent.set_defaults(func=_register_parent)
