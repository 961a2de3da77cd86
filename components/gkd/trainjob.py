"""Multi-node GKD: the pipeline's GKD step as a Kubeflow Trainer v2 ``TrainJob``.

When ``gkd.nodes`` > 1 and the step runs in a cluster, it does not train itself: it creates a
TrainJob (Kubeflow Trainer v2.3+, the ``torch-distributed`` ClusterTrainingRuntime by default) of
``nodes`` pods with ``gpus`` GPUs each, whose containers run the same ``puzzle gkd`` command under
``torchrun`` (the runtime sets the ``PET_*`` rendezvous variables) on the artifacts' S3 URIs; it
follows the job to completion, logging every change of its status to the step's log and to MLflow,
raises the job's own failure reason, deletes a finished job, and, being named after the KFP run,
re-attaches to the job an earlier attempt of the step created (a failed one is replaced: the new
job resumes from the sharded checkpoints beside the output).

The TrainJob is built with the ``kubeflow-trainer-api`` models (the Trainer's own OpenAPI types), not
YAML strings; everything that is not a ``.spec.trainer`` field (secrets and settings as environment,
``/dev/shm``, tolerations) is a ``runtimePatches`` entry of this module's manager. The RBAC it needs,
``trainer.kubeflow.org/trainjobs``: create, get, watch, delete, is :data:`RBAC_RULES` (the Helm chart
grants exactly that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_RUNTIME = "torch-distributed"
NODE = "node"
"""The runtime's training step: its ReplicatedJob and its container are both named ``node``."""
PATCH_MANAGER = "puzzle.kubeflow.org/gkd"
OUT_ANNOTATION = "puzzle.kubeflow.org/output"
RUN_LABEL = "pipelines.kubeflow.org/run_id"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SHM_SIZE = "16Gi"
CACHE_DIR = "/var/cache/puzzle"
CPU_PER_GPU, MEMORY_PER_GPU_GIB = 8, 64
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# The environment every pipeline step gets (pipelines/puzzle_pipeline.py sets the same on its tasks).
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")

RBAC_RULES = [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["create", "get", "watch", "delete"]}]
"""The Kubernetes permissions this module uses, in the profile namespace (the chart's Role)."""


class TrainJobFailed(RuntimeError):
    """The TrainJob failed or disappeared; ``reason`` and ``message`` are the job's own."""

    def __init__(self, name: str, reason: str, message: str) -> None:
        super().__init__(f"TrainJob {name} failed: {reason}: {message}")
        self.name, self.reason, self.message = name, reason, message


# --------------------------------------------------------------------------- the job


def in_cluster() -> bool:
    """True inside a Kubernetes pod (a service account is mounted); kfp.local and laptops are not."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and SA_NAMESPACE.is_file()


def job_name(kfp_run_id: str, out: str) -> str:
    """The TrainJob's name: the same for every attempt of the step in one KFP run (a DNS label)."""
    key = kfp_run_id or out
    return f"puzzle-gkd-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def gkd_command(
    child: str, parent: str, tokens: str, out: str, gkd_config: Mapping[str, Any], device: str
) -> list[str]:
    """``torchrun ... puzzle gkd`` on the artifacts' URIs, the GKD section as ``--set`` values; torchrun
    takes nodes, processes per node and the rendezvous from the runtime's ``PET_*`` variables."""
    command = ["torchrun", "--no-python", "puzzle", "gkd", child, parent, tokens, "--out", out]
    command += ["--device", device]
    for key, value in gkd_config.items():
        command += ["--set", f"gkd.{key}={json.dumps(value)}"]
    return command


@dataclass(frozen=True)
class JobRequest:
    """What the TrainJob runs and where; :func:`build_trainjob` turns it into the API object."""

    name: str
    namespace: str
    image: str
    command: list[str]
    nodes: int
    gpus_per_node: int
    out: str
    runtime: str = DEFAULT_RUNTIME
    s3_secret: str = "puzzle-s3"
    mlflow_secret: str = "puzzle-mlflow"
    env_config_map: str = "puzzle-env"
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def build_trainjob(request: JobRequest) -> Any:
    """The TrainJob (``kubeflow_trainer_api.models.TrainerV1alpha1TrainJob``) of ``request``."""
    from kubeflow_trainer_api import models as m

    def secret(name: str, key: str) -> Any:
        ref = m.IoK8sApiCoreV1SecretKeySelector(name=name, key=key, optional=True)
        return m.IoK8sApiCoreV1EnvVar(name=key, value_from=m.IoK8sApiCoreV1EnvVarSource(secret_key_ref=ref))

    def setting(key: str) -> Any:
        ref = m.IoK8sApiCoreV1ConfigMapKeySelector(name=request.env_config_map, key=key, optional=True)
        return m.IoK8sApiCoreV1EnvVar(
            name=key, value_from=m.IoK8sApiCoreV1EnvVarSource(config_map_key_ref=ref)
        )

    def quantity(value: str | int) -> Any:
        return m.IoK8sApimachineryPkgApiResourceQuantity(str(value))

    plain = {"PYTHONUNBUFFERED": "1", "PUZZLE_CACHE_DIR": CACHE_DIR, **request.env}
    env = [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in plain.items()]
    env += [secret(request.s3_secret, k) for k in S3_KEYS]
    env += [secret(request.mlflow_secret, k) for k in MLFLOW_KEYS]
    env += [setting(k) for k in ENV_KEYS]
    gpus = request.gpus_per_node
    resources = m.IoK8sApiCoreV1ResourceRequirements(
        requests={
            "cpu": quantity(CPU_PER_GPU * gpus),
            "memory": quantity(f"{MEMORY_PER_GPU_GIB * gpus}Gi"),
            GPU_RESOURCE: quantity(gpus),
        },
        limits={GPU_RESOURCE: quantity(gpus)},
    )
    pod = m.TrainerV1alpha1PodSpecPatch(
        tolerations=[m.IoK8sApiCoreV1Toleration(**GPU_TOLERATION)],
        volumes=[
            m.IoK8sApiCoreV1Volume(
                name="dshm",
                empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource(
                    medium="Memory", size_limit=quantity(SHM_SIZE)
                ),
            ),
            m.IoK8sApiCoreV1Volume(name="puzzle-cache", empty_dir=m.IoK8sApiCoreV1EmptyDirVolumeSource()),
        ],
        containers=[
            m.TrainerV1alpha1ContainerPatch(
                name=NODE,
                volume_mounts=[
                    m.IoK8sApiCoreV1VolumeMount(name="dshm", mount_path="/dev/shm"),
                    m.IoK8sApiCoreV1VolumeMount(name="puzzle-cache", mount_path=CACHE_DIR),
                ],
            )
        ],
    )
    patch = m.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        training_runtime_spec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(
                    replicated_jobs=[
                        m.TrainerV1alpha1ReplicatedJobPatch(
                            name=NODE,
                            template=m.TrainerV1alpha1JobTemplatePatch(
                                spec=m.TrainerV1alpha1JobSpecPatch(
                                    template=m.TrainerV1alpha1PodTemplatePatch(spec=pod)
                                )
                            ),
                        )
                    ]
                )
            )
        ),
    )
    labels = {"app.kubernetes.io/part-of": "puzzle", "puzzle.kubeflow.org/stage": "gkd", **request.labels}
    return m.TrainerV1alpha1TrainJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=request.name,
            namespace=request.namespace,
            labels=labels,
            annotations={OUT_ANNOTATION: request.out},
        ),
        spec=m.TrainerV1alpha1TrainJobSpec(
            runtime_ref=m.TrainerV1alpha1RuntimeRef(
                name=request.runtime, kind="ClusterTrainingRuntime", api_group=GROUP
            ),
            trainer=m.TrainerV1alpha1Trainer(
                image=request.image,
                command=request.command,
                env=env,
                num_nodes=request.nodes,
                num_proc_per_node=gpus,
                resources_per_node=resources,
            ),
            runtime_patches=[patch],
        ),
    )


# --------------------------------------------------------------------------- its status


def job_state(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(state, reason, message)``: state is Complete, Failed, Suspended, Running or Created."""
    status = obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    for state in ("Failed", "Complete", "Suspended"):
        if state in conditions:
            c = conditions[state]
            return state, str(c.get("reason") or state), str(c.get("message") or "")
    if any((j.get("active") or 0) > 0 for j in status.get("jobsStatus") or []):
        return "Running", "", ""
    return "Created", "", ""


def status_summary(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The job's state and counts, for the log and MLflow."""
    state, reason, message = job_state(obj)
    status = obj.get("status") or {}
    jobs = status.get("jobsStatus") or []
    summary: dict[str, Any] = {
        "state": state,
        "active": sum(j.get("active") or 0 for j in jobs),
        "ready": sum(j.get("ready") or 0 for j in jobs),
        "succeeded": sum(j.get("succeeded") or 0 for j in jobs),
        "failed": sum(j.get("failed") or 0 for j in jobs),
    }
    trainer = status.get("trainerStatus") or {}
    if trainer.get("progressPercentage") is not None:
        summary["progress_percent"] = trainer["progressPercentage"]
    if reason:
        summary["reason"] = reason
    if message:
        summary["message"] = message
    return summary


# --------------------------------------------------------------------------- following it


def _api_status(exc: BaseException) -> int | None:
    return getattr(exc, "status", None)


@dataclass
class Follower:
    """Creates (or re-attaches to), follows and deletes one TrainJob through a Kubernetes
    ``CustomObjectsApi``. ``stream`` is ``kubernetes.watch.Watch().stream`` (or a stand-in);
    ``on_status`` gets :func:`status_summary` whenever it changes."""

    api: Any
    namespace: str
    on_status: Callable[[dict[str, Any]], None] = lambda _: None
    stream: Callable[..., Iterator[dict[str, Any]]] | None = None
    watch_timeout_s: int = 300
    poll_s: float = 2.0
    delete_timeout_s: float = 600.0

    def _stream(self, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        if self.stream is not None:
            return self.stream(*args, **kwargs)
        from kubernetes import watch

        return watch.Watch().stream(*args, **kwargs)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name))
        except Exception as exc:
            if _api_status(exc) == 404:
                return None
            raise

    def submit(self, job: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """The job, created now or found from an earlier attempt (then ``True``); a failed one from an
        earlier attempt is deleted and created again (it resumes from its checkpoints)."""
        name = job["metadata"]["name"]
        existing = self.get(name)
        if existing is not None:
            state, reason, message = job_state(existing)
            if state != "Failed":
                log.info(
                    "GKD: re-attaching to TrainJob %s/%s (%s), created by an earlier attempt",
                    self.namespace,
                    name,
                    state,
                )
                return existing, True
            log.info(
                "GKD: TrainJob %s/%s of an earlier attempt failed (%s: %s); replacing it",
                self.namespace,
                name,
                reason,
                message,
            )
            self.delete(name, wait=True)
        try:
            created = self.api.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, dict(job)
            )
        except Exception as exc:
            if _api_status(exc) != 409:
                raise
            found = self.get(name)  # created concurrently by another attempt
            if found is None:
                raise
            return found, True
        log.info("GKD: created TrainJob %s/%s", self.namespace, name)
        return dict(created), False

    def follow(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Watch the job until it completes (returns its last state) or fails (raises
        :class:`TrainJobFailed` with its reason), reporting every change of its status."""
        name = obj["metadata"]["name"]
        last: list[dict[str, Any]] = []

        def settled(current: dict[str, Any]) -> bool:
            summary = status_summary(current)
            if not last or summary != last[-1]:
                log.info("GKD: TrainJob %s: %s", name, json.dumps(summary, sort_keys=True))
                self.on_status(summary)
                last.append(summary)
            if summary["state"] == "Failed":
                raise TrainJobFailed(name, summary.get("reason", "Failed"), summary.get("message", ""))
            return summary["state"] == "Complete"

        while not settled(obj):
            version = (obj.get("metadata") or {}).get("resourceVersion")
            updated: dict[str, Any] | None = None
            try:
                for event in self._stream(
                    self.api.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    field_selector=f"metadata.name={name}",
                    resource_version=version,
                    timeout_seconds=self.watch_timeout_s,
                ):
                    if event.get("type") == "DELETED":
                        raise TrainJobFailed(name, "Deleted", "the TrainJob was deleted before it finished")
                    updated = event.get("object") or updated
                    if updated is not None and settled(updated):
                        return updated
            except TrainJobFailed:
                raise
            except Exception as exc:
                if _api_status(exc) != 410:  # 410 Gone: the resource version expired; read it again
                    raise
                updated = None
            if updated is None:  # the watch ended without news (its timeout): read the job again
                time.sleep(self.poll_s)
                updated = self.get(name)
                if updated is None:
                    raise TrainJobFailed(name, "Deleted", "the TrainJob was deleted before it finished")
            obj = dict(updated)
        return obj

    def delete(self, name: str, *, wait: bool = False) -> None:
        """Delete the job and, through foreground propagation, its JobSet and pods."""
        try:
            self.api.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground"
            )
        except Exception as exc:
            if _api_status(exc) != 404:
                raise
            return
        deadline = time.monotonic() + self.delete_timeout_s
        while wait and self.get(name) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"TrainJob {self.namespace}/{name} was not deleted in {self.delete_timeout_s:.0f} s"
                )
            time.sleep(self.poll_s)
        log.info("GKD: deleted TrainJob %s/%s", self.namespace, name)

    def run(self, job: Mapping[str, Any]) -> dict[str, Any]:
        """Submit (or re-attach), follow to completion, delete; returns the completed job. A failed job
        is kept for inspection (``kubectl describe trainjob``) until a retry of the step replaces it."""
        obj, _ = self.submit(job)
        final = self.follow(obj)
        self.delete(job["metadata"]["name"])
        return final


# --------------------------------------------------------------------------- the step


def kubernetes_api() -> Any:
    """A ``CustomObjectsApi`` for this pod's service account (or the local kubeconfig)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def current_namespace() -> str:
    return SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.is_file() else "default"


def distill_on_trainjob(
    *,
    child: str,
    parent: str,
    tokens: str,
    out: str,
    local_out: str,
    gkd_config: Mapping[str, Any],
    device: str,
    nodes: int,
    gpus_per_node: int,
    image: str,
    runtime: str = DEFAULT_RUNTIME,
    s3_secret: str = "puzzle-s3",
    mlflow_secret: str = "puzzle-mlflow",
    env_config_map: str = "puzzle-env",
    kfp_run_id: str = "",
    tracking_config: Mapping[str, Any] | None = None,
    api: Any = None,
    namespace: str | None = None,
    stream: Callable[..., Iterator[dict[str, Any]]] | None = None,
) -> Any:
    """The GKD step on ``nodes`` x ``gpus_per_node`` GPUs: the TrainJob writes the ``child`` artifact
    at ``out`` (the step's output URI, reachable from every node: ``s3://``); it is then copied to
    ``local_out`` (the step's local output path) and its manifest returned."""
    from puzzle.io import artifacts, storage

    namespace = namespace or current_namespace()
    name = job_name(kfp_run_id, out)
    request = JobRequest(
        name=name,
        namespace=namespace,
        image=image,
        command=gkd_command(child, parent, tokens, out, gkd_config, device),
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        out=out,
        runtime=runtime,
        s3_secret=s3_secret,
        mlflow_secret=mlflow_secret,
        env_config_map=env_config_map,
        labels={RUN_LABEL: kfp_run_id} if kfp_run_id else {},
        env={"KFP_RUN_ID": kfp_run_id} if kfp_run_id else {},
    )
    job = build_trainjob(request).to_dict()
    api = api if api is not None else kubernetes_api()
    with _mlflow_status(tracking_config, kfp_run_id, f"{namespace}/{name}") as on_status:
        follower = Follower(api, namespace, on_status=on_status, stream=stream)
        obj, attached = follower.submit(job)
        written = out
        if attached:  # an earlier attempt's job writes where that attempt asked it to
            written = ((obj.get("metadata") or {}).get("annotations") or {}).get(OUT_ANNOTATION, out)
            if written != out:
                log.info("GKD: the re-attached TrainJob writes %s", written)
        follower.follow(obj)
        follower.delete(name)
    manifest = artifacts.require_manifest(written, "child")
    if str(Path(local_out)) != written.rstrip("/"):
        for rel in [*manifest.files, artifacts.MANIFEST]:
            storage.download_file(storage.join(written, rel), Path(local_out) / rel)
    return manifest


class _mlflow_status:
    """A status callback that records the TrainJob in the KFP run's MLflow run (tags: the job and its
    state; metrics: pods active/succeeded/failed, progress). Tracking never fails the step."""

    def __init__(self, tracking_config: Mapping[str, Any] | None, kfp_run_id: str, job: str) -> None:
        self.tracking_config, self.kfp_run_id, self.job = tracking_config, kfp_run_id, job
        self.run: Any = None
        self.context: Any = None
        self.step = 0

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        try:
            from components import _runtime
            from puzzle.mlflow import tracking

            settings = _runtime.tracking_settings(dict(self.tracking_config or {}))
            self.context = tracking.pipeline_run(
                name=f"puzzle-{self.kfp_run_id}" if self.kfp_run_id else "puzzle",
                tracking_uri=settings.uri,
                experiment=settings.experiment,
                kfp_run_id=self.kfp_run_id or None,
            )
            self.run = self.context.__enter__()
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            log.warning("GKD: TrainJob status is not tracked in MLflow: %s: %s", type(exc).__name__, exc)
            self.run = self.context = None
        return self.record

    def record(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.set_tags(
                {"puzzle.gkd.trainjob": self.job, "puzzle.gkd.trainjob.state": summary["state"]}
            )
            if summary.get("reason"):
                self.run.set_tags({"puzzle.gkd.trainjob.reason": summary["reason"]})
            numbers = {f"gkd_trainjob_{k}": v for k, v in summary.items() if isinstance(v, int | float)}
            self.run.log_metrics(numbers, step=self.step)
            self.step += 1
        except Exception as exc:  # noqa: BLE001
            log.warning("GKD: tracking the TrainJob status failed: %s: %s", type(exc).__name__, exc)

    def __exit__(self, *exc_info: Any) -> None:
        if self.context is not None:
            try:
                self.context.__exit__(*exc_info)
            except Exception as exc:  # noqa: BLE001
                log.warning("GKD: closing the MLflow run failed: %s", exc)
