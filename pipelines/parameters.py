"""Pipeline parameters from a ``puzzle run`` configuration.

The pipeline's parameters mirror :class:`puzzle.config.RunConfig` field by field: a field's path
with ``_`` for ``.`` names its parameter (``gkd.lr`` -> ``gkd_lr``, ``data.splits.bld`` ->
``data_splits_bld``, ``registry.gates.min_speedup`` -> ``registry_gates_min_speedup``), the
convention :mod:`pipelines.trigger` uses too. ``output`` is not a parameter: it becomes the run's
pipeline root, where KFP keeps every artifact. A few parameters exist only in the pipeline:
where the exported checkpoint is served from, how many GPUs GKD gets, which GPU product the
costs and the speed measurements must run on, the Kubernetes secret names, and the request
profile. Values KFP cannot carry as null become empty: ``search_space.kv_heads: null`` (every
divisor) is ``[]``, an unset registered model name is ``""`` (do not register).
"""

from __future__ import annotations

from typing import Any

from puzzle.config import RunConfig
from puzzle.errors import PuzzleError

# The GPU product label NVIDIA's GPU feature discovery puts on nodes, and the default target.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"

# Parameters of the pipeline that are not config fields, with their defaults.
CLUSTER_PARAMETERS: dict[str, Any] = {
    "serving_uri": "",
    "gkd_gpus": 1,
    "gpu_node_selector": {GPU_PRODUCT_LABEL: DEFAULT_GPU_PRODUCT},
    "s3_secret": "puzzle-s3",
    "mlflow_secret": "puzzle-mlflow",
    "env_config_map": "puzzle-env",
    "profile": "",
}

# Config fields that are not pipeline parameters (``output`` is the pipeline root).
NOT_PARAMETERS = ("output",)
# tracking.uri values that only mean something on the machine that runs `puzzle run`.
LOCAL_TRACKING = ("run-dir",)


class PipelineParameterError(PuzzleError, ValueError):
    """A configuration that cannot be turned into pipeline arguments; the message names the field."""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}_"))
        else:
            out[name] = value
    return out


def config_parameters(config: RunConfig) -> dict[str, Any]:
    """The pipeline arguments of every config field (``output`` aside), named by path."""
    data = config.to_dict()
    for name in NOT_PARAMETERS:
        data.pop(name)
    flat = _flatten(data)
    if flat["search_space_kv_heads"] is None:
        flat["search_space_kv_heads"] = []
    if flat["tracking_uri"] is None or flat["tracking_uri"] in LOCAL_TRACKING:
        # In the cluster the MLflow URI comes from the environment (ConfigMap or secret).
        flat["tracking_uri"] = ""
    if flat["registry_model_name"] is None:
        flat["registry_model_name"] = ""
    return flat


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
    arguments = {**config_parameters(config), **CLUSTER_PARAMETERS, **cluster}
    arguments["serving_uri"] = serving_uri
    arguments["profile"] = profile
    if gpu_product:
        arguments["gpu_node_selector"] = {GPU_PRODUCT_LABEL: gpu_product}
    return arguments
