"""The Puzzle pipeline, built from the stage graph (:mod:`puzzle.stages`): one task per stage, run by
the component of the same name, artifacts in the pipeline root (S3).

Parameters: ``parent``, ``device``, one dict per config section (``data``, ``library``, ``bld``,
..., ``registry``; defaults from :mod:`puzzle.config`, validated again inside each component) and
the cluster settings below. ``output`` is not a parameter: it is the run's pipeline root. A stage
with ``shards`` becomes fan_out -> ParallelFor -> its merge component; a stage with ``items`` (the
baselines) is one task whose component runs every item in turn and writes one folder per item (a
comparison, not the product; and zero items is then an empty folder, not an empty loop). Cluster
placement (GPU resources, the target GPU for costs and evaluation, tolerations, /dev/shm, secrets,
retries) is set here per task. After the
evaluation, ``register`` records the child (alias candidate) and the gate (``dsl.If``) runs
``promote`` (alias champion) only when the evaluation met the gates; an exit handler records the
run's outcome in MLflow whatever happened.

``puzzle pipeline compile`` writes ``pipelines/puzzle_pipeline.yaml``, which is committed; a test
fails when recompiling changes it.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from components.images import NEMO_IMAGE, image
from puzzle.config import RunConfig, field_docs, parse_config, section_names
from puzzle.stages import STAGES, Stage

PIPELINE_NAME = "puzzle"
PIPELINE_FILE = Path(__file__).with_name("puzzle_pipeline.yaml")

# At most this many shards or items of one stage run at once (each holds one GPU). Keep shard
# counts in the tens: every shard is a pod, and very wide fan-outs stall Argo and overflow etcd.
PARALLELISM = 8

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = "nvidia.com/gpu"  # the taint GPU node pools usually carry
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
DEFAULT_GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
SHM_SIZE = "16Gi"  # /dev/shm for NCCL and DataLoader workers (the container default is 64 MiB)
GPU_CPU, GPU_MEMORY = "8", "64Gi"
CPU_CPU, CPU_MEMORY = "2", "16Gi"
# A GPU step that fails (preempted node, XID error, OOM) is retried 3 times: after 1, 2, 4 min.
RETRIES, BACKOFF, BACKOFF_FACTOR, BACKOFF_MAX = 3, "60s", 2.0, "1h"

S3_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN",
}
ENV_KEYS = {
    "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL",
}

CLUSTER_PARAMETERS: dict[str, tuple[type, Any, str]] = {
    "serving_uri": (
        str,
        "",
        "s3://bucket/prefix the exported checkpoint is published to (empty: pipeline root only).",
    ),
    "gkd_gpus": (
        int,
        1,
        "GPUs of the GKD step (torchrun in one pod, DDP or FSDP2); of each node when gkd.nodes > 1.",
    ),
    "gkd_trainer_runtime": (
        str,
        "torch-distributed",
        "Kubeflow Trainer ClusterTrainingRuntime of the GKD TrainJob (gkd.nodes > 1).",
    ),
    "gpu_node_selector": (
        dict,
        {GPU_PRODUCT_LABEL: DEFAULT_GPU_PRODUCT},
        "Node selector of the target GPU: the cost table and the measured speedup are only valid there.",
    ),
    "s3_secret": (str, "puzzle-s3", "Kubernetes Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."),
    "mlflow_secret": (
        str,
        "puzzle-mlflow",
        "Kubernetes Secret with MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN.",
    ),
    "env_config_map": (
        str,
        "puzzle-env",
        "ConfigMap with AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL.",
    ),
    "profile": (str, "", "The request profile that started the run (recorded on the registered version)."),
}
"""Parameters of the pipeline that are not config fields: (type, default, description)."""

TOP_LEVEL = ("parent", "device")
"""Top-level config fields that are pipeline parameters (``output`` is the pipeline root)."""


def component(name: str) -> Any:
    """The component of stage (or helper) ``name``: ``components/<name>/component.py:<name>``."""
    return getattr(importlib.import_module(f"components.{name}.component"), name)


def _environment(task: dsl.PipelineTask, params: dict[str, Any]) -> dsl.PipelineTask:
    """S3 and MLflow settings and credentials, from Kubernetes objects named by run parameters.

    All optional: on a cluster with workload identity (IRSA, GKE) there is no S3 key pair, and a
    tracking server without authentication needs no MLflow secret.
    """
    kubernetes.use_secret_as_env(
        task, secret_name=params["s3_secret"], secret_key_to_env=S3_KEYS, optional=True
    )
    kubernetes.use_secret_as_env(
        task, secret_name=params["mlflow_secret"], secret_key_to_env=MLFLOW_KEYS, optional=True
    )
    kubernetes.use_config_map_as_env(
        task, config_map_name=params["env_config_map"], config_map_key_to_env=ENV_KEYS, optional=True
    )
    return task


def _place(
    task: dsl.PipelineTask,
    params: dict[str, Any],
    *,
    gpu: bool,
    target: bool = False,
    cache: bool = True,
    gpus: Any = 1,
) -> dsl.PipelineTask:
    """CPU steps get CPU resources; GPU steps a GPU, scheduled on GPU nodes (the target GPU model for
    steps whose figures are only valid there), retried with backoff, /dev/shm in memory."""
    task.set_caching_options(enable_caching=cache)
    if not gpu:
        task.set_cpu_request(CPU_CPU).set_memory_request(CPU_MEMORY)
        return _environment(task, params)
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    task.set_cpu_request(GPU_CPU).set_memory_request(GPU_MEMORY)
    task.set_retry(
        num_retries=RETRIES,
        backoff_duration=BACKOFF,
        backoff_factor=BACKOFF_FACTOR,
        backoff_max_duration=BACKOFF_MAX,
    )
    kubernetes.add_toleration(task, key=GPU_TAINT, operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
    )
    if target:
        kubernetes.add_node_selector_json(task, node_selector_json=params["gpu_node_selector"])
    return _environment(task, params)


class _Graph:
    """Turns the stages into tasks, keeping each stage's task (or collected outputs) by name."""

    def __init__(self, params: dict[str, Any], defaults: RunConfig) -> None:
        self.params = params
        self.defaults = defaults
        self.tasks: dict[str, Any] = {}
        self.tracked = {"tracking_config": params["tracking"], "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}

    def output(self, producer: str) -> Any:
        return self.tasks[producer].outputs[_stage(producer).output]

    def arguments(self, stage: Stage) -> dict[str, Any]:
        kwargs: dict[str, Any] = {f"{f}_uri": self.params[f] for f in stage.config_fields}
        kwargs.update({param: self.output(producer) for param, producer in stage.inputs.items()})
        kwargs.update({f"{s}_config": self.params[s] for s in stage.sections})
        if stage.gpu:
            kwargs["device"] = self.params["device"]
        return kwargs

    def add(self, stage: Stage) -> None:
        comp = component(stage.name)
        kwargs = self.arguments(stage)
        accepted = inspect.signature(comp.python_func).parameters
        kwargs.update({k: v for k, v in self.tracked.items() if k in accepted})
        gpus = 1
        if stage.name == "gkd":
            self.add_gkd(stage, comp, kwargs)
            return
        if stage.name == "export":
            kwargs["serving_uri"] = self.params["serving_uri"]
        place: dict[str, Any] = {"gpu": stage.gpu, "target": stage.target_gpu, "gpus": gpus}
        if stage.shards is not None:
            section, field = stage.shards.split(".")
            plan = _place(fan_out(self.params[section], section, field), self.params, gpu=False)
            plan.set_display_name(f"plan {stage.name} shards")
            with dsl.ParallelFor(plan.output, parallelism=PARALLELISM, name=f"{stage.name}-shards") as index:
                shard = _place(comp(**kwargs, shard_index=index), self.params, **place)
                shard.set_display_name(f"{stage.name} shard")
            merge = component(f"{stage.name}_merge")
            merge_kwargs = {"shards": dsl.Collected(shard.outputs[stage.output]), **self.tracked}
            if "library" in inspect.signature(merge.python_func).parameters:
                merge_kwargs["library"] = kwargs["library"]  # the base the BLD shards were trained from
            merged = _place(merge(**merge_kwargs), self.params, gpu=False)
            self.tasks[stage.name] = merged.set_display_name(f"merge {stage.name} shards")
            return
        self.tasks[stage.name] = _place(comp(**kwargs), self.params, **place).set_display_name(stage.summary)

    def add_gkd(self, stage: Stage, comp: Any, kwargs: dict[str, Any]) -> None:
        """gkd_plan -> gkd: the step trains in its pod on gkd_gpus GPUs, or, with gkd.nodes > 1, asks
        for none and runs GKD as a Kubeflow Trainer TrainJob of gkd.nodes x gkd_gpus GPUs (a retry
        re-attaches to it). The plan reads gkd.nodes at run time (a section field cannot be a
        resource request itself)."""
        params = self.params
        plan = _place(
            component("gkd_plan")(gkd_config=params["gkd"], gpus=params["gkd_gpus"]), params, gpu=False
        )
        plan.set_display_name("plan gkd: GPUs of the gkd pod (0: a TrainJob trains)")
        kwargs.update(
            gpus=params["gkd_gpus"],
            trainer_runtime=params["gkd_trainer_runtime"],
            s3_secret=params["s3_secret"],
            mlflow_secret=params["mlflow_secret"],
            env_config_map=params["env_config_map"],
        )
        if self.defaults.gkd.backend == "nemo":  # the same step in the puzzle-nemo image
            comp = dsl.component(base_image=image(NEMO_IMAGE), install_kfp_package=False)(comp.python_func)
        task = _place(comp(**kwargs), params, gpu=True, gpus=plan.output)
        task.after(plan)  # the GPU count is not an input: without this, nothing orders the two
        self.tasks[stage.name] = task.set_display_name(stage.summary)

    def add_registry(self, stage: Stage) -> None:
        """register (alias candidate, the gate's verdict) -> [passed] promote (alias champion)."""
        kwargs = self.arguments(stage)
        kwargs.update(profile=self.params["profile"], **self.tracked)
        registered = _place(component("register")(**kwargs), self.params, gpu=False, cache=False)
        registered.set_display_name("register candidate")
        with dsl.If(registered.output == True, name="gate"):  # noqa: E712 - a KFP condition
            promoted = component("promote")(
                export=self.output("export"),
                registry_config=self.params["registry"],
                tracking_config=self.params["tracking"],
            )
            _place(promoted, self.params, gpu=False, cache=False).set_display_name("promote to champion")


def _stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def fan_out(config: Any, section: str, field: str) -> dsl.PipelineTask:
    return component("fan_out")(config=config, section=section, field=field)


def section_value(section: Any) -> dict[str, Any]:
    """A section as a pipeline value: KFP values cannot be null, so null fields are left out (the
    component's validation gives them their default, which is null for every such field)."""

    def prune(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: prune(v) for k, v in value.items() if v is not None}
        return value

    return prune(dataclasses.asdict(section))


def parameters(defaults: RunConfig) -> list[inspect.Parameter]:
    """The pipeline's parameters: the top-level fields, one dict per section, the cluster settings."""
    params = [
        inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=getattr(defaults, name), annotation=str
        )
        for name in TOP_LEVEL
    ]
    params += [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=section_value(getattr(defaults, name)),
            annotation=dict,
        )
        for name in section_names()
    ]
    params += [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=tp)
        for name, (tp, default, _) in CLUSTER_PARAMETERS.items()
    ]
    return params


def _docstring(defaults: RunConfig) -> str:
    top = field_docs(type(defaults))
    from puzzle.config import section_type

    lines = [
        "Puzzle (distillation-based NAS): compress a parent LLM into a faster child for a target GPU and",
        "workload, export it as a Hugging Face checkpoint and register it in MLflow when it meets the gates.",
        "",
        "Args:",
    ]
    for name in TOP_LEVEL:
        lines.append(f"    {name}: {top[name]}")
    for name in section_names():
        doc = inspect.cleandoc(section_type(name).__doc__ or "").replace("\n", " ")
        lines.append(f"    {name}: the {name} section (docs/config.md): {doc}")
    for name, (_, _, doc) in CLUSTER_PARAMETERS.items():
        lines.append(f"    {name}: {doc}")
    return "\n".join(lines)


def build_pipeline(defaults: RunConfig | None = None) -> Any:
    """The pipeline for a configuration's defaults (the embedded default when None)."""
    defaults = defaults or parse_config({})
    signature = inspect.Signature(parameters(defaults))

    def puzzle(*args: Any) -> None:
        params = dict(zip(signature.parameters, args, strict=True))
        graph = _Graph(params, defaults)
        outcome = component("record_outcome")(
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, tracking_config=params["tracking"]
        )
        _place(outcome, params, gpu=False, cache=False)
        with dsl.ExitHandler(outcome, name="puzzle-run"):
            for stage in STAGES:
                if stage.output:
                    graph.add(stage)
                else:
                    graph.add_registry(stage)

    puzzle.__signature__ = signature  # type: ignore[attr-defined]
    puzzle.__doc__ = _docstring(defaults)
    return dsl.pipeline(name=PIPELINE_NAME)(puzzle)


puzzle_pipeline = build_pipeline()


def compile_pipeline(path: str | Path = PIPELINE_FILE, pipeline: Any = None) -> Path:
    """Write the compiled pipeline (IR YAML) to ``path``, byte for byte the same on every compile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline or puzzle_pipeline, package_path=str(path))
    path.write_text(_stable_header(path.read_text()))
    return path


_DEFAULT_COMMENT = re.compile(r"^(#\s+\w+: dict \[Default: )(\{.*\})(\])$")


def _stable_header(text: str) -> str:
    """KFP's header comment lists dict defaults in protobuf map order, which changes between
    processes; sort their keys (the YAML body below is already sorted)."""

    def ordered(value: Any) -> Any:
        return {k: ordered(value[k]) for k in sorted(value)} if isinstance(value, dict) else value

    lines = []
    for line in text.splitlines(keepends=True):
        match = _DEFAULT_COMMENT.match(line.rstrip("\n"))
        if match:
            line = f"{match[1]}{ordered(ast.literal_eval(match[2]))}{match[3]}\n"
        lines.append(line)
    return "".join(lines)


if __name__ == "__main__":
    print(compile_pipeline())
