"""The Helm chart renders, lints and validates, with secure defaults, for realistic value sets.

Rendering and linting use Helm v4 itself (helm-python-sdk, offline); every rendered manifest is
validated against the Kubernetes OpenAPI schemas with kubernetes-validate in strict mode (unknown
fields are errors) for the oldest and the newest Kubernetes the chart supports. No cluster is
reachable here, so nothing is applied: what only a cluster shows is in the README.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "puzzle"
RELEASE, NAMESPACE = "puzzle", "ml-team"
KUBE_VERSIONS = ("1.27.0", "1.37.0")  # Chart.yaml kubeVersion floor, newest bundled schemas

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Credentials come from Secrets the platform team already manages; S3 through IRSA-style
    # annotations and a key pair, MLflow with a token.
    "existing-secrets": {
        "serviceAccount": {
            "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/puzzle"}
        },
        "secrets": {
            "webhook": {"existingSecret": "mlflow-webhook", "key": "hmac", "create": False},
            "s3": {"existingSecret": "s3-credentials"},
            "mlflow": {"existingSecret": "mlflow-credentials"},
        },
        "s3": {"endpointUrl": "http://seaweedfs.kubeflow.svc.cluster.local:8333"},
    },
    "no-network-policy": {"networkPolicy": {"enabled": False}},
    # The trigger's state on an emptyDir (persistence is on by default).
    "ephemeral-state": {"trigger": {"persistence": {"enabled": False}}},
    # A separate Kubeflow profile namespace, S3 keys created by the chart, and the launcher's
    # pipeline-root settings for a SeaweedFS/MinIO-style store.
    "launcher": {
        "kfp": {"namespace": "kubeflow-user-team-a"},
        "secrets": {
            "s3": {"create": True, "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "not-a-real-key"}
        },
        "launcher": {
            "enabled": True,
            "defaultPipelineRoot": "s3://puzzle/pipeline-root",
            "s3": {"endpoint": "seaweedfs.kubeflow:8333", "disableSSL": True},
        },
    },
    "no-schedule": {"setup": {"schedule": {"enabled": False}, "pipelineVersion": "2026-11-26"}},
    # Bind Kubeflow's own edit role, keep the delivery-id store on a volume, pin the image.
    "cluster-role-persistent": {
        "rbac": {"clusterRoleName": "kubeflow-pipelines-edit"},
        "trigger": {"persistence": {"enabled": True, "storageClassName": "standard"}},
        "image": {"digest": "sha256:" + "ab" * 32},
        "secrets": {"mlflow": {"create": True, "username": "puzzle", "password": "not-a-real-password"}},
    },
    "schedule-only": {"trigger": {"enabled": False}},
}


def _render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert "puzzle/templates/NOTES.txt" in rendered
    return [
        doc
        for path, text in rendered.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def manifests(chart: helm.Chart) -> dict[str, list[dict[str, Any]]]:
    """Every value set rendered once."""
    return {name: _render(chart, values) for name, values in VALUE_SETS.items()}


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = objects(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def job_steps(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    jobs = objects(docs, "Job")
    return containers(jobs[0]["spec"]["template"]["spec"]) if jobs else []


def uses_kfp(container: dict[str, Any]) -> bool:
    """The trigger and the setup steps that call the KFP API (``puzzle pipeline ...``)."""
    return container["name"] == "trigger" or container["args"][0] == "pipeline"


def webhook_secret_volume(pod: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in pod["volumes"] if v["name"] == "webhook-secret")["secret"]


def values_file() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


# ----------------------------------------------------------------------------- validity


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_rendered_manifest_is_valid_kubernetes_in_strict_mode(manifests, value_set: str) -> None:
    docs = manifests[value_set]
    assert docs, "the chart rendered nothing"
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                name = f"{doc['kind']}/{doc['metadata']['name']}"
                pytest.fail(f"{value_set}: {name} invalid for {version} at {where}: {exc.message}")
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("value_set", ["default", "launcher", "schedule-only"])
def test_helm_lint_reports_no_warnings_or_errors(value_set: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_values_file_documents_every_top_level_key_and_the_schema_knows_them_all(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None and schema["additionalProperties"] is False
    text = (CHART / "values.yaml").read_text()
    for key in values_file():
        assert key in schema["properties"], f"values.yaml key {key!r} is missing from values.schema.json"
        block = text.split(f"\n{key}:")[0].rstrip().splitlines()
        assert block and block[-1].lstrip().startswith("#"), (
            f"values.yaml key {key!r} has no comment above it"
        )

    # Every object the schema describes with properties is closed, except the Kubernetes-shaped
    # and free-form ones (security contexts, the run config itself).
    def closed(node: dict[str, Any], path: str) -> None:
        if "properties" in node and path not in {
            ".podSecurityContext",
            ".securityContext",
            ".pipeline.config",
        }:
            assert node.get("additionalProperties") is False, f"schema at {path or '/'} accepts unknown keys"
        for name, sub in node.get("properties", {}).items():
            closed(sub, f"{path}.{name}")

    closed(schema, "")


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"trigger": {"prot": 8080}}, "additional properties 'prot' not allowed"),
        ({"trigger": {"port": "8080"}}, "/trigger/port"),
        ({"setup": {"schedule": {"cron": "0 3 * * 0"}}}, "/setup/schedule/cron"),
        ({"securityContext": {"readOnlyRootFilesystem": False}}, "/securityContext/readOnlyRootFilesystem"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        ({"secrets": {"webhook": {"create": False}}}, "/secrets/webhook"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"trigger": {"logLevel": "verbose"}}, "/trigger/logLevel"),
        ({"trigger": {"pipelinePackage": "pipeline.yaml"}}, "/trigger/pipelinePackage"),
    ],
)
def test_values_that_break_the_schema_are_rejected_before_anything_renders(
    chart, values, complaint: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert complaint in str(caught.value)


def test_template_checks_reject_half_configured_credentials(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmError, match="secrets.s3.accessKeyId is required"):
        chart.render({"secrets": {"s3": {"create": True}}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmError, match="secrets.mlflow.create: set username and password"):
        chart.render(
            {"secrets": {"mlflow": {"create": True, "username": "u"}}}, name=RELEASE, namespace=NAMESPACE
        )


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_pod_runs_non_root_read_only_without_privileges_and_with_resources(
    manifests, value_set: str
) -> None:
    pods = pod_specs(manifests[value_set])
    assert pods
    for pod in pods:
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 10001 and ctx["runAsGroup"] == 10001
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["privileged"] is False and sc["runAsNonRoot"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (c["name"], bound)
            # A read-only root filesystem needs writable scratch space where Python writes.
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts and env_of(c)["HOME"]["value"] == "/tmp"


def test_no_credential_is_ever_a_literal_environment_value(manifests) -> None:
    secret_like = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY")
    for value_set, docs in manifests.items():
        for pod in pod_specs(docs):
            for c in containers(pod):
                for name, var in env_of(c).items():
                    if any(s in name for s in secret_like) and name != "KF_PIPELINES_SA_TOKEN_PATH":
                        assert "valueFrom" in var and "value" not in var, (value_set, c["name"], name)


def test_the_service_account_token_for_the_kfp_api_is_projected_with_its_audience(manifests) -> None:
    for pod in pod_specs(manifests["default"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        source = volumes["kfp-token"]["projected"]["sources"][0]["serviceAccountToken"]
        assert source["audience"] == "pipelines.kubeflow.org" and source["path"] == "token"
        assert source["expirationSeconds"] >= 600
        for c in containers(pod):
            if not uses_kfp(c):  # register-webhook talks to MLflow only: no KFP token
                assert "KF_PIPELINES_SA_TOKEN_PATH" not in env_of(c), c["name"]
                assert "kfp-token" not in {m["name"] for m in c["volumeMounts"]}, c["name"]
                continue
            path = env_of(c)["KF_PIPELINES_SA_TOKEN_PATH"]["value"]
            mount = next(m for m in c["volumeMounts"] if m["name"] == "kfp-token")
            assert path == f"{mount['mountPath']}/{source['path']}" and mount["readOnly"] is True
            assert env_of(c)["KF_PIPELINES_ENDPOINT"]["value"].startswith("http://ml-pipeline.")


def kfp_rbac(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents without the GKD step's TrainJob Role and RoleBinding."""
    return [d for d in docs if not d["metadata"]["name"].endswith("-gkd-trainjobs")]


def test_rbac_grants_exactly_the_kfp_verbs_in_the_kfp_namespace(manifests) -> None:
    docs = kfp_rbac(manifests["launcher"])
    role, binding = one(docs, "Role"), one(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kubeflow-user-team-a"
    rules = {tuple(r["resources"]): set(r["verbs"]) for r in role["rules"]}
    assert all(r["apiGroups"] == ["pipelines.kubeflow.org"] for r in role["rules"])
    assert "create" in rules[("runs",)] and "delete" not in rules[("runs",)]
    assert {"create", "update"} <= rules[("pipelines", "pipelines/versions")]
    assert {"create", "delete", "list"} <= rules[("jobs",)]  # update-or-create of the recurring run
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert sa["automountServiceAccountToken"] is False

    other = kfp_rbac(manifests["cluster-role-persistent"])
    assert not objects(other, "Role")
    assert one(other, "RoleBinding")["roleRef"]["kind"] == "ClusterRole"
    assert one(other, "RoleBinding")["roleRef"]["name"] == "kubeflow-pipelines-edit"


def test_rbac_lets_the_runs_gkd_step_create_follow_and_delete_trainjobs_and_nothing_else(
    chart: helm.Chart, manifests
) -> None:
    from components.gkd.trainjob import RBAC_RULES

    for value_set, subject in (("default", "default-editor"), ("launcher", "default-editor")):
        docs = manifests[value_set]
        (role,) = [d for d in objects(docs, "Role") if d["metadata"]["name"].endswith("-gkd-trainjobs")]
        (binding,) = [
            d for d in objects(docs, "RoleBinding") if d["metadata"]["name"] == role["metadata"]["name"]
        ]
        namespace = VALUE_SETS[value_set].get("kfp", {}).get("namespace", NAMESPACE)
        assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
        assert role["rules"] == RBAC_RULES  # exactly what components/gkd/trainjob.py calls
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": subject, "namespace": namespace}]
    # The run's pods' own ServiceAccount when the chart names one; none of it without rbac.trainJobs.
    docs = _render(chart, {"pipeline": {"cluster": {"serviceAccount": "pipeline-runner"}}})
    (binding,) = [d for d in objects(docs, "RoleBinding") if d["metadata"]["name"].endswith("-gkd-trainjobs")]
    assert binding["subjects"][0]["name"] == "pipeline-runner"
    for doc in docs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    docs = _render(chart, {"rbac": {"trainJobs": False}})
    assert not [d for d in docs if d["metadata"]["name"].endswith("-gkd-trainjobs")]


# ----------------------------------------------------------------------------- trigger service


def test_trigger_probes_hit_the_health_endpoint_on_the_served_port(manifests) -> None:
    docs = manifests["default"]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert args[:2] == ["trigger", "serve"] and args[args.index("--port") + 1] == str(ports["http"])
    assert args[args.index("--host") + 1] == "0.0.0.0"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_network_policy_admits_only_mlflow_to_the_webhook_port_and_limits_egress(manifests) -> None:
    docs = manifests["default"]
    (policy,) = [p for p in objects(docs, "NetworkPolicy") if p["metadata"]["name"] == RELEASE]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": "http"}]
    assert ingress["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mlflow"}}}
    ]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert egress_ports.count(53) == 2 and 8888 in egress_ports and 5000 in egress_ports
    assert not objects(manifests["no-network-policy"], "NetworkPolicy")


def test_state_volume_is_a_claim_only_when_persistence_is_on(manifests) -> None:
    def state(docs):
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        return next(v for v in pod["volumes"] if v["name"] == "state")

    assert "emptyDir" in state(manifests["ephemeral-state"]) and not objects(
        manifests["ephemeral-state"], "PersistentVolumeClaim"
    )
    default = one(manifests["default"], "PersistentVolumeClaim")  # on by default (issue 16)
    assert state(manifests["default"])["persistentVolumeClaim"]["claimName"] == default["metadata"]["name"]
    docs = manifests["cluster-role-persistent"]
    claim = one(docs, "PersistentVolumeClaim")
    assert state(docs)["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["storageClassName"] == "standard"


# ----------------------------------------------------------------------------- secrets


def test_default_install_creates_only_a_generated_webhook_secret(manifests) -> None:
    docs = manifests["default"]
    (secret,) = objects(docs, "Secret")
    assert secret["metadata"]["name"] == f"{RELEASE}-webhook"
    import base64

    generated = base64.b64decode(secret["data"]["webhook-secret"]).decode()
    assert len(generated) == 48 and generated.isalnum()
    for pod in pod_specs(docs):
        assert webhook_secret_volume(pod) == {
            "secretName": secret["metadata"]["name"],
            "defaultMode": 0o440,
            "items": [{"key": "webhook-secret", "path": "secret"}],
        }
        for c in containers(pod):
            # Only the containers that read the webhook secret mount it.
            mounts = [m for m in c["volumeMounts"] if m["name"] == "webhook-secret"]
            assert bool(mounts) == ("--secret-file" in c["args"]), c["name"]
            for mount in mounts:
                assert mount["readOnly"] is True
                assert c["args"][c["args"].index("--secret-file") + 1] == f"{mount['mountPath']}/secret"
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--secret-file" in container["args"]
    assert "AWS_ACCESS_KEY_ID" not in env_of(container) and "MLFLOW_TRACKING_PASSWORD" not in env_of(
        container
    )


def test_existing_secrets_are_referenced_by_name_and_none_is_created(manifests) -> None:
    docs = manifests["existing-secrets"]
    assert not objects(docs, "Secret")
    # Each container gets the credentials it uses: the trigger all of them, the setup steps only
    # MLflow's (register-webhook) or none (the KFP steps authenticate with the token).
    wanted = {
        "trigger": {"s3", "mlflow"},
        "upload-pipeline": set(),
        "schedule": set(),
        "register-webhook": {"mlflow"},
    }
    seen = set()
    for pod in pod_specs(docs):
        for c in containers(pod):
            seen.add(c["name"])
            env = env_of(c)
            refs = {n: v["valueFrom"]["secretKeyRef"] for n, v in env.items() if "valueFrom" in v}
            assert not any("WEBHOOK" in name for name in env), "the webhook secret is a file, never env"
            if "s3" in wanted[c["name"]]:
                assert refs["AWS_ACCESS_KEY_ID"] == {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
                assert refs["AWS_SECRET_ACCESS_KEY"]["name"] == "s3-credentials"
            else:
                assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(refs), c["name"]
            if "mlflow" in wanted[c["name"]]:
                assert refs["MLFLOW_TRACKING_TOKEN"] == {
                    "name": "mlflow-credentials",
                    "key": "MLFLOW_TRACKING_TOKEN",
                    "optional": True,
                }
            else:
                assert not any(name.startswith("MLFLOW_TRACKING_") for name in refs), c["name"]
            assert env["AWS_ENDPOINT_URL"]["value"] == VALUE_SETS["existing-secrets"]["s3"]["endpointUrl"]
        assert webhook_secret_volume(pod)["secretName"] == "mlflow-webhook"
        assert webhook_secret_volume(pod)["items"] == [{"key": "hmac", "path": "secret"}]
    assert seen == set(wanted)
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["annotations"] == VALUE_SETS["existing-secrets"]["serviceAccount"]["annotations"]


def test_created_credential_secrets_hold_the_given_keys(manifests) -> None:
    import base64

    s3 = next(s for s in objects(manifests["launcher"], "Secret") if s["metadata"]["name"].endswith("-s3"))
    assert base64.b64decode(s3["data"]["AWS_ACCESS_KEY_ID"]).decode() == "AKIAEXAMPLE"
    mlflow = next(
        s
        for s in objects(manifests["cluster-role-persistent"], "Secret")
        if s["metadata"]["name"].endswith("-mlflow")
    )
    assert set(mlflow["data"]) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


# ----------------------------------------------------------------------------- pipeline defaults


def test_pipeline_defaults_are_one_valid_run_configuration_per_profile(manifests) -> None:
    from puzzle.config import parse_config

    docs = manifests["default"]
    cm = next(c for c in objects(docs, "ConfigMap") if c["metadata"]["name"].endswith("-profiles"))
    values = values_file()
    assert set(cm["data"]) == {f"{name}.yaml" for name in values["pipeline"]["profiles"]}
    runs = {
        key: parse_config(yaml.safe_load(text)) for key, text in cm["data"].items()
    }  # ConfigError names a bad field
    default = runs["default.yaml"]
    assert default.parent == values["pipeline"]["config"]["parent"]
    assert default.output.startswith("s3://") and default.registry.model_name == "puzzle-child"
    assert default.tracking.uri == values["mlflow"]["trackingUri"]
    assert default.costs.batch_sizes == [1, 8] and default.search.constraints == ["throughput>=1.5x"]
    # A profile overrides only what it names; lists are replaced, not appended to.
    fast = runs["fast.yaml"]
    assert fast.search.constraints == ["throughput>=2x"]
    assert fast.replace(search=default.search) == default
    # The trigger reads the directory of profiles, the schedule one of them.
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "profiles")
    assert (
        next(v for v in pod["volumes"] if v["name"] == "profiles")["configMap"]["name"]
        == cm["metadata"]["name"]
    )
    args = pod["containers"][0]["args"]
    assert args[args.index("--profiles") + 1] == mount["mountPath"]
    schedule = next(s["args"] for s in job_steps(docs) if s["name"] == "schedule")
    profile = values["setup"]["schedule"]["profile"]
    assert schedule[schedule.index("--profiles-dir") + 1] == mount["mountPath"]
    assert schedule[schedule.index("--profile") + 1] == profile
    # A config change rolls the trigger pods.
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/profiles"]) == 64


def test_a_schedule_profile_that_does_not_exist_is_rejected(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmError, match='setup.schedule.profile "nightly" is not in pipeline.profiles'):
        chart.render({"setup": {"schedule": {"profile": "nightly"}}}, name=RELEASE, namespace=NAMESPACE)


def test_launcher_config_map_is_optional_and_points_at_the_chart_s3_secret(manifests) -> None:
    def launcher(docs):
        return [c for c in objects(docs, "ConfigMap") if c["metadata"]["name"] == "kfp-launcher"]

    assert not launcher(manifests["default"])
    (cm,) = launcher(manifests["launcher"])
    assert cm["metadata"]["namespace"] == "kubeflow-user-team-a"
    assert cm["data"]["defaultPipelineRoot"] == "s3://puzzle/pipeline-root"
    default = yaml.safe_load(cm["data"]["providers"])["s3"]["default"]
    assert default["endpoint"] == "seaweedfs.kubeflow:8333" and default["disableSSL"] is True
    assert default["credentials"] == {
        "fromEnv": False,
        "secretRef": {
            "secretName": f"{RELEASE}-s3",
            "accessKeyKey": "AWS_ACCESS_KEY_ID",
            "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
        },
    }


# ----------------------------------------------------------------------------- setup Job


def test_setup_job_is_a_post_install_and_upgrade_hook_with_ordered_idempotent_steps(manifests) -> None:
    docs = manifests["default"]
    job = one(docs, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    # Replaced by the next upgrade's Job, kept until then (or the TTL) so its logs can be read.
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    steps = job_steps(docs)
    assert [s["name"] for s in steps] == ["upload-pipeline", "schedule", "register-webhook"]
    assert [s["name"] for s in job["spec"]["template"]["spec"]["initContainers"]] == [
        "upload-pipeline",
        "schedule",
    ]
    upload, schedule, webhook = (s["args"] for s in steps)
    assert all(s["command"] == ["puzzle"] for s in steps)

    # Every step names the object it creates, so a re-run updates it instead of adding another.
    assert upload[:2] == ["pipeline", "upload"] and upload[upload.index("--name") + 1] == "puzzle"
    assert "--version" not in upload  # the CLI names the version by the compiled YAML's hash
    assert (
        schedule[:2] == ["pipeline", "schedule"] and schedule[schedule.index("--name") + 1] == "puzzle-weekly"
    )
    assert len(schedule[schedule.index("--cron") + 1].split()) == 6  # seconds first
    assert schedule[schedule.index("--max-concurrency") + 1] == "1" and "--no-catchup" in schedule
    assert (
        webhook[:2] == ["trigger", "register-webhook"]
        and webhook[webhook.index("--name") + 1] == "puzzle-trigger"
    )
    service = one(docs, "Service")
    assert webhook[webhook.index("--url") + 1] == (
        f"http://{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{service['spec']['ports'][0]['port']}/webhook"
    )
    assert webhook[webhook.index("--secret-file") + 1] == "/var/run/secrets/puzzle/webhook/secret"


def test_setup_job_skips_the_steps_that_are_switched_off(manifests) -> None:
    steps = job_steps(manifests["no-schedule"])
    assert [s["name"] for s in steps] == ["upload-pipeline", "register-webhook"]
    assert steps[0]["args"][-2:] == ["--version", "2026-11-26"]
    schedule_only = manifests["schedule-only"]
    assert [s["name"] for s in job_steps(schedule_only)] == ["upload-pipeline", "schedule"]
    assert not objects(schedule_only, "Deployment") and not objects(schedule_only, "Service")


def test_scheduled_runs_get_the_cluster_settings_and_the_credentials_by_name(manifests) -> None:
    def schedule_args(value_set: str) -> list[str]:
        return next(s["args"] for s in job_steps(manifests[value_set]) if s["name"] == "schedule")

    def flag(args: list[str], name: str) -> str | None:
        return args[args.index(name) + 1] if name in args else None

    default = schedule_args("default")
    cluster = values_file()["pipeline"]["cluster"]
    assert flag(default, "--pipeline") == "puzzle"  # the newest uploaded version runs
    assert flag(default, "--gpu-product") == cluster["gpuProduct"]
    assert flag(default, "--gkd-gpus") == str(cluster["gkdGpus"])
    assert flag(default, "--s3-secret") is None and flag(default, "--mlflow-secret") is None
    # The run's pods read settings from this ConfigMap, in the namespace the runs execute in.
    for value_set, namespace in (("default", NAMESPACE), ("launcher", "kubeflow-user-team-a")):
        name = flag(schedule_args(value_set), "--env-config-map")
        (env,) = [c for c in objects(manifests[value_set], "ConfigMap") if c["metadata"]["name"] == name]
        assert env["metadata"]["namespace"] == namespace
        assert env["data"]["MLFLOW_TRACKING_URI"] == values_file()["mlflow"]["trackingUri"]
    existing = schedule_args("existing-secrets")
    assert flag(existing, "--s3-secret") == "s3-credentials"
    assert flag(existing, "--mlflow-secret") == "mlflow-credentials"
    env = next(
        c
        for c in objects(manifests["existing-secrets"], "ConfigMap")
        if c["metadata"]["name"] == "puzzle-env"
    )
    assert env["data"]["AWS_ENDPOINT_URL"] == VALUE_SETS["existing-secrets"]["s3"]["endpointUrl"]
    assert flag(schedule_args("launcher"), "--s3-secret") == f"{RELEASE}-s3"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.fixture(scope="module")
def cli() -> argparse.ArgumentParser:
    from puzzle.cli import build_parser

    return build_parser()


@pytest.mark.parametrize("step", ["upload-pipeline", "schedule", "register-webhook", "trigger"])
def test_every_command_the_chart_runs_parses_with_the_real_cli(manifests, cli, step: str) -> None:
    """The chart's commands are what `puzzle` accepts, flag for flag."""
    docs = manifests["default"]
    pods = {c["name"]: c for pod in pod_specs(docs) for c in containers(pod)}
    args = pods[step]["args"]
    group = _subcommands(cli).get(args[0])
    if group is None or args[1] not in _subcommands(group):
        pytest.skip(f"`puzzle {' '.join(args[:2])}` is not written yet")
    try:
        parsed = cli.parse_args(args)
    except SystemExit:
        pytest.fail(f"`puzzle {' '.join(args)}` does not parse with the CLI")
    if step == "trigger":
        env = env_of(pods[step])
        assert parsed.backend == "kfp" and parsed.kfp_host == env["KF_PIPELINES_ENDPOINT"]["value"]
        assert parsed.kfp_namespace == NAMESPACE and parsed.port == pods[step]["ports"][0]["containerPort"]
        mounts = {m["name"]: m["mountPath"] for m in pods[step]["volumeMounts"]}
        assert parsed.state_db.startswith(mounts["state"] + "/") and parsed.profiles == mounts["profiles"]
        assert parsed.secret_file.startswith(mounts["webhook-secret"] + "/")
        assert parsed.request_tag == values_file()["trigger"]["requestTag"]


# ----------------------------------------------------------------------------- images


def test_default_image_is_the_cpu_image_of_components_images_yaml(manifests, chart: helm.Chart) -> None:
    images = yaml.safe_load((ROOT / "components" / "images.yaml").read_text())
    expected = f"{images['registry']}/{images['images']['cpu']['name']}:{images['version']}"
    assert chart.metadata["appVersion"] == images["version"]
    for pod in pod_specs(manifests["default"]):
        assert {c["image"] for c in containers(pod)} == {expected}
    pinned = {c["image"] for pod in pod_specs(manifests["cluster-role-persistent"]) for c in containers(pod)}
    assert pinned == {f"{expected}@sha256:{'ab' * 32}"}
