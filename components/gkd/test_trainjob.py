"""Multi-node GKD through Kubeflow Trainer: the TrainJob a 2-node request builds is a valid Trainer API
object that carries the image, command, resources, secrets, /dev/shm and tolerations; against a
recorded Kubernetes API (the real client, its HTTP layer replaced) the step creates, watches and
deletes the job, surfaces a failure's reason, re-attaches on retry, and uses exactly the verbs the
chart's Role grants."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import pytest
from kfp import dsl

from components.gkd import trainjob

NAMESPACE = "team-a"
OUT = "s3://pipeline-root/run-1/gkd/distilled"


def request(**changes: Any) -> trainjob.JobRequest:
    command = trainjob.gkd_command(
        "s3://root/realize/child",
        "s3://root/convert/parent",
        "s3://root/data/tokens",
        OUT,
        {"token_budget": 10**9, "parallel": "fsdp", "nodes": 2, "micro_batch_size": None},
        "cuda",
    )
    base = dict(
        name=trainjob.job_name("run-1", OUT),
        namespace=NAMESPACE,
        image="ghcr.io/puzzle-kubeflow/puzzle-gpu:0.1.0",
        command=command,
        nodes=2,
        gpus_per_node=8,
        out=OUT,
        labels={trainjob.RUN_LABEL: "run-1"},
    )
    return trainjob.JobRequest(**{**base, **changes})


# --------------------------------------------------------------------------- the object


def test_the_trainjob_of_a_two_node_request_is_a_valid_trainer_object_with_everything_the_pods_need() -> None:
    from kubeflow_trainer_api import models

    job = trainjob.build_trainjob(request()).to_dict()
    # The Trainer API models read it back unchanged: no unknown or mistyped field was dropped.
    assert models.TrainerV1alpha1TrainJob.from_dict(json.loads(json.dumps(job))).to_dict() == job
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"].startswith("puzzle-gkd-") and len(job["metadata"]["name"]) <= 63
    assert job["metadata"]["annotations"][trainjob.OUT_ANNOTATION] == OUT
    assert job["metadata"]["labels"][trainjob.RUN_LABEL] == "run-1"
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "name": "torch-distributed",
        "kind": "ClusterTrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["image"] == "ghcr.io/puzzle-kubeflow/puzzle-gpu:0.1.0"
    command = trainer["command"]
    assert command[:4] == ["torchrun", "--no-python", "puzzle", "gkd"]  # rendezvous: the runtime's PET_*
    assert command[4:7] == ["s3://root/realize/child", "s3://root/convert/parent", "s3://root/data/tokens"]
    assert command[command.index("--out") + 1] == OUT
    assert 'gkd.parallel="fsdp"' in command and "gkd.micro_batch_size=null" in command
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8"}
    assert trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "puzzle-s3",
        "key": "AWS_ACCESS_KEY_ID",
        "optional": True,
    }
    assert env["MLFLOW_TRACKING_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "puzzle-mlflow"
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "puzzle-env"
    assert not any("value" in e for n, e in env.items() if "SECRET" in n or "TOKEN" in n or "PASSWORD" in n)
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == trainjob.PATCH_MANAGER
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    pod_patch = replicated["template"]["spec"]["template"]["spec"]
    assert trainjob.GPU_TOLERATION in pod_patch["tolerations"]
    volumes = {v["name"]: v for v in pod_patch["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    (container,) = pod_patch["containers"]
    assert container["name"] == "node"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]

    # The node pod the Trainer makes of it (the trainer fields and the patch on the runtime's
    # `node` container) is valid Kubernetes, in strict mode (unknown fields are errors).
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "node-0"},
        "spec": {
            "containers": [
                {
                    "name": "node",
                    "image": trainer["image"],
                    "command": trainer["command"],
                    "env": trainer["env"],
                    "resources": trainer["resourcesPerNode"],
                    "volumeMounts": container["volumeMounts"],
                }
            ],
            "volumes": pod_patch["volumes"],
            "tolerations": pod_patch["tolerations"],
        },
    }
    for version in ("1.27.0", "1.37.0"):
        kubernetes_validate.validate(pod, version, strict=True)


def test_the_trainjob_pods_get_the_same_secrets_and_settings_as_every_pipeline_step() -> None:
    from pipelines import puzzle_pipeline

    assert set(trainjob.S3_KEYS) == set(puzzle_pipeline.S3_KEYS)
    assert set(trainjob.MLFLOW_KEYS) == set(puzzle_pipeline.MLFLOW_KEYS)
    assert set(trainjob.ENV_KEYS) == set(puzzle_pipeline.ENV_KEYS)
    assert (
        trainjob.SHM_SIZE == puzzle_pipeline.SHM_SIZE
        and trainjob.GPU_RESOURCE == puzzle_pipeline.GPU_RESOURCE
    )


# --------------------------------------------------------------------------- a recorded cluster


class Response:
    """What urllib3 returns to the Kubernetes client: a JSON body, or watch events line by line."""

    REASONS = {200: "OK", 201: "Created", 404: "Not Found", 409: "Conflict", 410: "Gone"}

    def __init__(self, status: int, body: Any = None, events: list[dict[str, Any]] | None = None) -> None:
        self.status, self.reason = status, self.REASONS.get(status, "")
        self.data = json.dumps(body if body is not None else {}).encode()
        self.headers = {"content-type": "application/json"}
        self.events = events or []

    def getheaders(self) -> dict[str, str]:
        return self.headers

    def getheader(self, name: str, default: Any = None) -> Any:
        return self.headers.get(name, default)

    def stream(self, amt: Any = None, decode_content: bool = False) -> Any:
        for event in self.events:
            yield (json.dumps(event) + "\n").encode()

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class RecordedCluster:
    """Stands in for the client's urllib3 pool: answers a scripted list of responses in order and
    records every request as (verb, path, query, body)."""

    def __init__(self, script: list[Response]) -> None:
        self.script = list(script)
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []

    def request(self, method: str, url: str, fields: Any = None, body: Any = None, **_: Any) -> Response:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        for key, value in fields or []:
            query.setdefault(key, []).append(str(value))
        self.requests.append((method, parts.path, query, json.loads(body) if body else None))
        assert self.script, f"unexpected request {method} {url}"
        return self.script.pop(0)

    def api(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = "https://kubernetes.test"
        api_client = client.ApiClient(configuration)
        api_client.rest_client.pool_manager = self
        return client.CustomObjectsApi(api_client)

    def verbs(self) -> set[tuple[str, str, str]]:
        """(API group, resource, RBAC verb) of every recorded request."""
        found = set()
        for method, path, query, _ in self.requests:
            parts = path.strip("/").split("/")  # apis/<group>/<version>/namespaces/<ns>/<resource>[/<name>]
            group, resource, named = parts[1], parts[5], len(parts) > 6
            if method == "GET":
                verb = "get" if named else ("watch" if query.get("watch") == ["True"] else "list")
            else:
                verb = {"POST": "create", "DELETE": "delete", "PUT": "update", "PATCH": "patch"}[method]
            found.add((group, resource, verb))
        return found


def job_object(
    state: str | None, *, version: str, active: int = 0, reason: str = "", message: str = ""
) -> dict:
    job = trainjob.build_trainjob(request()).to_dict()
    job["metadata"]["resourceVersion"] = version
    status: dict[str, Any] = {"jobsStatus": [{"name": "node", "active": active, "ready": active}]}
    if state is not None:
        status["conditions"] = [
            {
                "type": state,
                "status": "True",
                "reason": reason or state,
                "message": message,
                "lastTransitionTime": "2026-11-27T00:00:00Z",
            }
        ]
    job["status"] = status
    return job


NOT_FOUND = Response(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
DELETED = Response(200, {"kind": "Status", "status": "Success"})


def events(*objects: dict) -> Response:
    return Response(200, events=[{"type": "MODIFIED", "object": o} for o in objects])


@pytest.fixture
def finished_child(tiny_realized: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path_factory) -> str:
    """A distilled child artifact where the TrainJob writes it (it is what the pods would leave)."""
    from puzzle.child.gkd import distill
    from puzzle.config import GKDConfig

    out = tmp_path_factory.mktemp("trainjob-out") / "distilled"
    distill(
        str(tiny_realized),
        str(tiny_parent),
        str(tiny_tokens),
        str(out),
        GKDConfig(token_budget=128, batch_size=4),
        device="cpu",
    )
    return str(out)


def run_step(cluster: RecordedCluster, out: str, local_out: Path, tracking_config: dict | None = None) -> Any:
    return trainjob.distill_on_trainjob(
        child="s3://root/realize/child",
        parent="s3://root/convert/parent",
        tokens="s3://root/data/tokens",
        out=out,
        local_out=str(local_out),
        gkd_config={"token_budget": 128, "nodes": 2},
        device="cuda",
        nodes=2,
        gpus_per_node=8,
        image="ghcr.io/puzzle-kubeflow/puzzle-gpu:0.1.0",
        kfp_run_id="run-1",
        tracking_config=tracking_config,
        api=cluster.api(),
        namespace=NAMESPACE,
    )


def test_the_step_creates_the_trainjob_watches_it_to_completion_streams_its_status_and_deletes_it(
    finished_child: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow import MlflowClient

    created = job_object(None, version="1")
    cluster = RecordedCluster(
        [
            NOT_FOUND,  # no job of an earlier attempt
            Response(201, created),
            events(job_object(None, version="2", active=2), job_object("Complete", version="3")),
            DELETED,
        ]
    )
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "trainjob"}
    with caplog.at_level(logging.INFO, logger="components.gkd.trainjob"):
        manifest = run_step(cluster, finished_child, tmp_path / "local", tracking)

    methods = [(m, p.rsplit("/", 1)[-1]) for m, p, _, _ in cluster.requests]
    name = trainjob.job_name("run-1", finished_child)
    assert methods == [("GET", name), ("POST", "trainjobs"), ("GET", "trainjobs"), ("DELETE", name)]
    posted = cluster.requests[1][3]
    assert posted["metadata"]["name"] == name and posted["metadata"]["namespace"] == NAMESPACE
    assert posted["spec"]["trainer"]["command"][4] == "s3://root/realize/child"
    watch_query = cluster.requests[2][2]
    assert watch_query["watch"] == ["True"] and watch_query["fieldSelector"] == [f"metadata.name={name}"]
    assert cluster.requests[3][2]["propagationPolicy"] == ["Foreground"]  # the JobSet and pods go too
    states = [
        json.loads(r.getMessage().split(": ", 2)[2])["state"]
        for r in caplog.records
        if "TrainJob puzzle-gkd" in r.getMessage()
    ]
    assert states == ["Created", "Running", "Complete"]
    # the artifact the pods wrote is this step's output
    assert manifest.kind == "child" and (tmp_path / "local" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "local" / "manifest.json").read_text())["summary"] == manifest.summary
    # and the status went to the KFP run's MLflow run
    client = MlflowClient(tracking_uri=tracking["uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("trainjob").experiment_id])
    assert run.data.tags["puzzle.gkd.trainjob"] == f"{NAMESPACE}/{name}"
    assert run.data.tags["puzzle.gkd.trainjob.state"] == "Complete"
    active = client.get_metric_history(run.info.run_id, "gkd_trainjob_active")
    assert [m.value for m in sorted(active, key=lambda m: m.step)] == [0, 2, 0]


def test_a_failed_trainjob_fails_the_step_with_its_reason_and_is_kept_for_inspection(tmp_path: Path) -> None:
    cluster = RecordedCluster(
        [
            NOT_FOUND,
            Response(201, job_object(None, version="1")),
            events(
                job_object(None, version="2", active=2),
                job_object(
                    "Failed",
                    version="3",
                    reason="JobSetFailed",
                    message="jobset failed: job node-1 has failed (BackoffLimitExceeded)",
                ),
            ),
        ]
    )
    with pytest.raises(trainjob.TrainJobFailed, match=r"JobSetFailed: jobset failed: .*BackoffLimitExceeded"):
        run_step(cluster, OUT, tmp_path / "local")
    assert [m for m, *_ in cluster.requests] == ["GET", "POST", "GET"]  # no DELETE: kept for kubectl describe


def test_a_retried_step_reattaches_to_its_running_trainjob_and_replaces_a_failed_one(
    finished_child: str, tmp_path: Path
) -> None:
    running = job_object(None, version="7", active=2)
    running["metadata"]["annotations"][trainjob.OUT_ANNOTATION] = finished_child
    reattach = RecordedCluster([Response(200, running), events(job_object("Complete", version="8")), DELETED])
    manifest = run_step(reattach, finished_child, tmp_path / "a")
    assert [m for m, *_ in reattach.requests] == ["GET", "GET", "DELETE"]  # no second job
    assert reattach.requests[1][2]["resourceVersion"] == ["7"]  # the watch goes on from what it read
    assert manifest.kind == "child"

    failed = job_object("Failed", version="3", reason="JobSetFailed", message="node lost")
    replace = RecordedCluster(
        [
            Response(200, failed),  # the earlier attempt's job failed
            DELETED,
            NOT_FOUND,  # gone: create it again (it resumes from the checkpoints beside the output)
            Response(201, job_object(None, version="4")),
            events(job_object("Complete", version="5")),
            DELETED,
        ]
    )
    run_step(replace, finished_child, tmp_path / "b")
    assert [m for m, *_ in replace.requests] == ["GET", "DELETE", "GET", "POST", "GET", "DELETE"]

    # Everything the step did is within the chart's Role, and the Role grants nothing it does not use.
    used = reattach.verbs() | replace.verbs()
    granted = {
        (g, r, v)
        for rule in trainjob.RBAC_RULES
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert used == granted


def test_the_gkd_component_runs_a_trainjob_for_more_than_one_node_in_a_cluster(
    finished_child: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.gkd.component import gkd

    cluster = RecordedCluster(
        [
            NOT_FOUND,
            Response(201, job_object(None, version="1")),
            events(job_object("Complete", version="2")),
            DELETED,
        ]
    )
    monkeypatch.setattr(trainjob, "in_cluster", lambda: True)
    monkeypatch.setattr(trainjob, "current_namespace", lambda: NAMESPACE)
    monkeypatch.setattr(trainjob, "kubernetes_api", cluster.api)
    distilled = dsl.Model(name="distilled", uri=finished_child, metadata={})
    gkd.python_func(
        child=dsl.Model(name="child", uri="s3://root/realize/child", metadata={}),
        parent=dsl.Model(name="parent", uri="s3://root/convert/parent", metadata={}),
        tokens=dsl.Dataset(name="tokens", uri="s3://root/data/tokens", metadata={}),
        distilled=distilled,
        gkd_config={"token_budget": 128, "nodes": 2},
        device="cuda",
        gpus=4,
        kfp_run_id="run-7",
    )
    posted = cluster.requests[1][3]
    assert posted["spec"]["trainer"]["numNodes"] == 2 and posted["spec"]["trainer"]["numProcPerNode"] == 4
    assert posted["metadata"]["name"] == trainjob.job_name("run-7", finished_child)
    assert distilled.metadata["kind"] == "child" and distilled.metadata["steps"] == 1
