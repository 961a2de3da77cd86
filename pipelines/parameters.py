"""Pipeline arguments from a ``puzzle run`` configuration.

The pipeline takes ``parent``, ``device`` and one dict per config section, so a run's arguments
are the validated :class:`puzzle.config.RunConfig` section by section; ``output`` becomes the run's
pipeline root, where KFP keeps every artifact, and ``tracking.uri: run-dir`` means the cluster's
``MLFLOW_TRACKING_URI`` in a pod. The cluster settings
(:data:`pipelines.puzzle_pipeline.CLUSTER_PARAMETERS`) come from the caller.
"""

from __future__ import annotations

from typing import Any

from puzzle.config import RunConfig, section_names
from puzzle.errors import PuzzleError


class PipelineParameterError(PuzzleError, ValueError):
    """A configuration that cannot be turned into pipeline arguments; the message names the field."""


def config_parameters(config: RunConfig) -> dict[str, Any]:
    """The pipeline arguments of a configuration: ``parent``, ``device`` and every section."""
    from pipelines.puzzle_pipeline import TOP_LEVEL, section_value

    arguments: dict[str, Any] = {name: getattr(config, name) for name in TOP_LEVEL}
    for name in section_names():
        arguments[name] = section_value(getattr(config, name))
    return arguments


def check_parent(parent: str) -> None:
    """A parent the pods can reach: s3://, models:/, a hub id or the embedded ``smollm2``."""
    if parent == "smollm2" or parent.startswith(("s3://", "models:/")):
        return
    if parent.startswith(("/", ".", "~")) or parent.endswith(".gguf") or parent.count("/") != 1:
        raise PipelineParameterError(
            f"parent {parent!r} is a local path, which the pipeline's pods cannot read: upload it and pass "
            "s3://bucket/prefix, or use models:/NAME/VERSION, a hub id (org/name) or 'smollm2'"
        )


def pipeline_arguments(
    config: RunConfig,
    *,
    serving_uri: str = "",
    gpu_product: str | None = None,
    profile: str = "",
    **cluster: Any,
) -> dict[str, Any]:
    """Every argument of a pipeline run of ``config``.

    ``serving_uri`` is where the exported checkpoint is published (``s3://bucket/prefix``; empty
    keeps it in the pipeline root only); ``gpu_product`` the value of the node label
    ``nvidia.com/gpu.product`` the cost and speed measurements must run on; ``cluster`` any other
    pipeline-only parameter (``gkd_gpus``, ``s3_secret``, ``mlflow_secret``, ``env_config_map``).
    """
    from pipelines.puzzle_pipeline import CLUSTER_PARAMETERS, GPU_PRODUCT_LABEL

    unknown = sorted(set(cluster) - set(CLUSTER_PARAMETERS))
    if unknown:
        raise PipelineParameterError(
            f"unknown pipeline parameters {unknown}; known: {sorted(CLUSTER_PARAMETERS)}"
        )
    if serving_uri and not serving_uri.startswith("s3://"):
        raise PipelineParameterError(
            f"serving_uri must be an s3://bucket/prefix that serving engines read, got {serving_uri!r}"
        )
    check_parent(config.parent)
    arguments = {**config_parameters(config), **{k: v[1] for k, v in CLUSTER_PARAMETERS.items()}, **cluster}
    arguments["serving_uri"] = serving_uri
    arguments["profile"] = profile
    if gpu_product:
        arguments["gpu_node_selector"] = {GPU_PRODUCT_LABEL: gpu_product}
    return arguments
