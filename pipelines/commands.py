"""``puzzle pipeline``: compile, upload, submit and schedule the Kubeflow pipeline.

Registered on the ``puzzle`` command through the ``puzzle.commands`` entry point (the method
package never imports ``pipelines``); kfp is imported only inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DEFAULT_PACKAGE = Path(__file__).resolve().with_name("puzzle_pipeline.yaml")


def _package_default() -> str:
    return os.environ.get("PUZZLE_PIPELINE_PACKAGE") or str(DEFAULT_PACKAGE)


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default=os.environ.get("KF_PIPELINES_ENDPOINT"),
        help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888 "
        "(default: $KF_PIPELINES_ENDPOINT)",
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("PUZZLE_KFP_NAMESPACE"),
        help="Kubeflow namespace (profile) of multi-user KFP (default: $PUZZLE_KFP_NAMESPACE)",
    )
    p.add_argument(
        "--token-path",
        default=None,
        help="service-account token file (default: $KF_PIPELINES_SA_TOKEN_PATH, "
        "/var/run/secrets/kubeflow/pipelines/token or the pod's service-account token when present)",
    )


def _add_run_config(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--config", help="run configuration YAML, the same file `puzzle run --config` takes")
    group.add_argument("--profile", help="a named run configuration: PROFILES_DIR/<profile>.yaml")
    p.add_argument(
        "--profiles-dir",
        default=None,
        help="directory of <profile>.yaml run configurations "
        "(default: $PUZZLE_PROFILES_DIR or /etc/puzzle/profiles)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set search.constraints='[\"throughput>=2x\"]' (repeatable)",
    )
    p.add_argument(
        "--serving-uri", default="", help="s3://bucket/prefix the exported checkpoint is published to"
    )
    p.add_argument(
        "--gpu-product",
        default=None,
        help="node label nvidia.com/gpu.product of the target GPU (costs and speed are measured there), "
        "e.g. NVIDIA-H100-80GB-HBM3",
    )
    p.add_argument(
        "--gkd-gpus", type=int, default=None, help="GPUs of the GKD step (torchrun in one pod; default 1)"
    )
    p.add_argument(
        "--s3-secret",
        default=None,
        help="Kubernetes Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (default puzzle-s3)",
    )
    p.add_argument(
        "--mlflow-secret",
        default=None,
        help="Kubernetes Secret with MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN (default puzzle-mlflow)",
    )
    p.add_argument(
        "--env-config-map",
        default=None,
        help="ConfigMap with AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, MLFLOW_TRACKING_URI (default puzzle-env)",
    )
    p.add_argument(
        "--package", default=_package_default(), help="compiled pipeline YAML (default: the committed one)"
    )
    p.add_argument(
        "--experiment", default=os.environ.get("PUZZLE_KFP_EXPERIMENT", "puzzle"), help="KFP experiment"
    )
    p.add_argument("--service-account", default=None, help="Kubernetes service account the run's pods use")


def register(subparsers: argparse._SubParsersAction) -> None:
    pipe = subparsers.add_parser(
        "pipeline",
        help="Kubeflow pipeline: compile, upload, submit a run, schedule recurring runs",
        description=(
            "The Puzzle pipeline on Kubeflow Pipelines (KFP v2): one containerized component per phase, "
            "artifacts in S3. Runs take their parameters from the same config file as `puzzle run`."
        ),
    )
    sub = pipe.add_subparsers(dest="pipeline_command", metavar="ACTION")

    comp = sub.add_parser(
        "compile",
        help="compile the pipeline to KFP IR YAML",
        description="Write the compiled pipeline (the committed file is pipelines/puzzle_pipeline.yaml).",
    )
    comp.add_argument("--out", default=str(DEFAULT_PACKAGE), help="where to write the YAML")
    comp.add_argument(
        "--gkd-backend",
        choices=("torch", "nemo"),
        default="torch",
        help="nemo: the GKD step runs in the puzzle-nemo image and gkd.backend defaults to nemo "
        "(write it to another --out, e.g. pipelines/puzzle_pipeline_nemo.yaml, and submit with --package)",
    )
    comp.set_defaults(func=run_compile)

    up = sub.add_parser(
        "upload",
        help="upload the compiled pipeline as a new version (idempotent)",
        description="Create the pipeline if needed and upload the package as a version; a version "
        "of the same name is left as it is, so repeating the command changes nothing.",
    )
    _add_connection(up)
    up.add_argument("--name", default="puzzle", help="pipeline name in KFP (default puzzle)")
    up.add_argument(
        "--version", default=None, help="version name (default: <package version>-<hash of the YAML>)"
    )
    up.add_argument("--package", default=_package_default(), help="compiled pipeline YAML")
    up.set_defaults(func=run_upload)

    submit = sub.add_parser(
        "submit",
        help="start one run",
        description="Start a run of the pipeline with the parameters of a config file or profile. "
        "The config's output (s3://...) becomes the run's pipeline root.",
    )
    _add_connection(submit)
    _add_run_config(submit)
    submit.add_argument("--run-name", default=None, help="run name (default: puzzle-<config digest>-<time>)")
    submit.set_defaults(func=run_submit)

    sched = sub.add_parser(
        "schedule",
        help="create or update a recurring run (six-field cron)",
        description="Create the recurring run NAME, or replace it when its cron, parameters or pipeline "
        "version changed (KFP has no update call); unchanged settings leave it alone. Cron has six fields, "
        "seconds first: '0 0 3 * * 0' is Sundays at 03:00:00.",
    )
    _add_connection(sched)
    _add_run_config(sched)
    sched.add_argument("--name", required=True, help="recurring run name (its identity for update-or-create)")
    sched.add_argument("--cron", required=True, help="six fields, seconds first, e.g. '0 0 3 * * 0'")
    sched.add_argument(
        "--pipeline",
        default=None,
        help="uploaded pipeline whose newest version runs (default: the --package file itself)",
    )
    sched.add_argument(
        "--max-concurrency", type=int, default=1, help="runs of this schedule at once (default 1)"
    )
    sched.add_argument(
        "--no-catchup",
        action="store_true",
        default=True,
        help="skip runs missed while paused or down (the default)",
    )
    sched.add_argument("--catchup", dest="no_catchup", action="store_false", help="backfill missed runs")
    sched.set_defaults(func=run_schedule)
    pipe.set_defaults(func=lambda _args: pipe.print_help() or 2)


def _cluster_arguments(args: argparse.Namespace) -> dict:
    cluster = {
        "gkd_gpus": args.gkd_gpus,
        "s3_secret": args.s3_secret,
        "mlflow_secret": args.mlflow_secret,
        "env_config_map": args.env_config_map,
    }
    return {k: v for k, v in cluster.items() if v is not None}


def _prepare(args: argparse.Namespace):
    """Everything checked before contacting KFP: config/profile, serving URI, parameters."""
    from pipelines import client as cli
    from pipelines.parameters import pipeline_arguments

    config = cli.load_run_config(
        args.config, args.profile, profiles_dir=args.profiles_dir, overrides=args.overrides
    )
    arguments = pipeline_arguments(
        config,
        serving_uri=cli.serving_uri_for(args.serving_uri),
        gpu_product=args.gpu_product,
        profile=args.profile or "",
        **_cluster_arguments(args),
    )
    return config, arguments


def run_compile(args: argparse.Namespace) -> int:
    from pipelines.puzzle_pipeline import build_pipeline, compile_pipeline
    from puzzle.config import parse_config

    pipeline = None
    if args.gkd_backend != "torch":
        pipeline = build_pipeline(parse_config({"gkd": {"backend": args.gkd_backend}}))
    print(f"compiled pipeline written to {compile_pipeline(args.out, pipeline)}")
    return 0


def run_upload(args: argparse.Namespace) -> int:
    from pipelines import client as cli

    client = cli.connect(args.host, namespace=args.namespace, token=args.token_path)
    result = cli.upload(client, args.package, name=args.name, version=args.version)
    state = "uploaded" if result.created else "already there"
    print(f"pipeline {args.name} version {result.version} ({result.version_id}): {state}")
    return 0


def run_submit(args: argparse.Namespace) -> int:
    from pipelines import client as cli

    config, arguments = _prepare(args)
    cli.check_gkd_image(config, args.package)
    client = cli.connect(args.host, namespace=args.namespace, token=args.token_path)
    run_id = cli.submit(
        client,
        config,
        arguments,
        package=args.package,
        experiment=args.experiment,
        namespace=args.namespace,
        run_name=args.run_name,
        service_account=args.service_account,
    )
    print(
        json.dumps(
            {"run_id": run_id, "experiment": args.experiment, "pipeline_root": cli.pipeline_root(config)}
        )
    )
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    from pipelines import client as cli

    cron = cli.validate_cron(args.cron)
    if args.max_concurrency < 1:
        raise cli.PipelineCLIError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    config, arguments = _prepare(args)
    client = cli.connect(args.host, namespace=args.namespace, token=args.token_path)
    pipeline_id = version_id = None
    package = args.package
    if args.pipeline:
        pipeline_id, version_id = cli.latest_version(client, args.pipeline)
        package = None
    cli.check_gkd_image(config, package)
    result = cli.schedule(
        client,
        config,
        arguments,
        name=args.name,
        cron=cron,
        experiment=args.experiment,
        pipeline_id=pipeline_id,
        version_id=version_id,
        package=package,
        namespace=args.namespace,
        max_concurrency=args.max_concurrency,
        no_catchup=args.no_catchup,
        service_account=args.service_account,
    )
    print(f"recurring run {args.name} ({result.recurring_run_id}): {result.action}, cron '{cron}'")
    return 0
