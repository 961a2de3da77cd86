"""The trigger service: MLflow webhooks start Puzzle runs, verified, once, and tagged back."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from corpus import STDLIB_TEXT  # noqa: E402

from pipelines.trigger import build_service, signature
from pipelines.trigger.backends import RunRequest
from pipelines.trigger.server import TriggerServer
from pipelines.trigger.settings import (
    TAG_CHILD,
    TAG_PROFILE,
    TAG_RUN_ID,
    TAG_STATE,
    TriggerConfigError,
    TriggerSettings,
)
from pipelines.trigger.store import TriggerStore

SECRET = "puzzle-webhook-secret"


def test_signature_matches_mlflows_own_signer() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps({"entity": "model_version_tag", "action": "set", "data": {"name": "m"}})
    expected = _generate_hmac_signature(SECRET, "d-1", "1700000000", body)
    assert signature.sign(SECRET, "d-1", "1700000000", body.encode()) == expected
    assert signature.verify(SECRET, "d-1", "1700000000", body.encode(), expected)
    assert signature.verify(SECRET, "d-1", "1700000000", body.encode(), f"v1,AAAA {expected}")  # rotation
    assert not signature.verify("other", "d-1", "1700000000", body.encode(), expected)
    assert not signature.verify(SECRET, "d-2", "1700000000", body.encode(), expected)
    assert not signature.verify(SECRET, "d-1", "1700000001", body.encode(), expected)
    assert not signature.verify(SECRET, "d-1", "1700000000", body.encode() + b" ", expected)


def test_settings_never_show_the_secret_and_refuse_bad_values(tmp_path: Path) -> None:
    settings = TriggerSettings(tracking_uri="http://mlflow", secret=SECRET, state_db=str(tmp_path / "s.db"))
    assert SECRET not in repr(settings)
    with pytest.raises(TriggerConfigError, match="secret"):
        TriggerSettings(tracking_uri="http://mlflow", secret="")
    with pytest.raises(TriggerConfigError, match="request-tag"):
        TriggerSettings(tracking_uri="http://mlflow", secret=SECRET, request_tag=TAG_STATE)
    with pytest.raises(TriggerConfigError, match="--backend kfp needs"):
        TriggerSettings(tracking_uri="http://mlflow", secret=SECRET, backend="kfp")


def test_delivery_ids_survive_a_restart(tmp_path: Path) -> None:
    store = TriggerStore(tmp_path / "state.sqlite")
    assert store.remember_delivery("d-1", "model_version_tag.set")
    assert not store.remember_delivery("d-1", "model_version_tag.set")
    store.close()
    reopened = TriggerStore(tmp_path / "state.sqlite")
    assert not reopened.remember_delivery("d-1", "model_version_tag.set")
    assert reopened.remember_delivery("d-2", "model_version_tag.set")


def test_kfp_backend_submits_the_compiled_pipeline_with_the_profile_config(tmp_path: Path) -> None:
    """Argument mapping against the committed compiled pipeline; the KFP API itself needs a
    cluster (README), so the client here records the call instead of reaching one."""
    import yaml

    from pipelines.trigger.backends import KfpBackend
    from pipelines.trigger.profiles import run_config

    package = Path(__file__).resolve().parents[1] / "pipelines" / "puzzle_pipeline.yaml"
    calls: list[dict[str, Any]] = []

    class RecordingClient:
        def create_run_from_pipeline_package(self, pipeline_file: str, **kwargs: Any) -> Any:
            calls.append({"pipeline_file": pipeline_file, **kwargs})
            return type("Result", (), {"run_id": "kfp-run-42"})()

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "fast.yaml").write_text(
        "output: s3://runs/puzzle\ngkd: {lr: 0.0003}\nsearch: {constraints: ['throughput>=2x']}\n"
    )
    config = run_config(
        "fast", "models:/p/3", profiles_dir=str(profiles), overrides=["registry.model_name=p-puzzle"]
    )
    backend = KfpBackend("http://kfp", package, experiment="puzzle", client_factory=RecordingClient)
    assert backend.submit(RunRequest("p", "3", "fast", config, "p-puzzle")) == "kfp-run-42"
    (call,) = calls
    args = call["arguments"]
    assert (
        args["parent"] == "models:/p/3"
        and args["profile"] == "fast"
        and args["registry"]["model_name"] == "p-puzzle"
    )
    assert args["gkd"]["lr"] == 3e-4 and args["search"]["constraints"] == ["throughput>=2x"]
    assert call["pipeline_root"] == "s3://runs/puzzle" and call["run_name"] == "puzzle-p-v3-fast"
    spec = next(d for d in yaml.safe_load_all(package.read_text()) if "root" in d)
    declared = spec["root"]["inputDefinitions"]["parameters"]
    assert set(args) <= set(declared), f"arguments the pipeline does not declare: {set(args) - set(declared)}"


# --------------------------------------------------------------------------- helpers


class RecordingBackend:
    """Counts submissions (the security tests must show that nothing reaches a backend)."""

    name = "recording"

    def __init__(self) -> None:
        self.requests: list[RunRequest] = []

    def submit(self, request: RunRequest) -> str:
        self.requests.append(request)
        return f"rec-{len(self.requests)}"


def register_parent(parent_dir: Path, name: str) -> str:
    """A registered parent model version whose files are a Hugging Face checkpoint."""
    from puzzle.mlflow import registry

    return registry.register_parent(str(parent_dir), name).version


def set_tag_via_rest(mlflow_url: str, name: str, version: str, key: str, value: str) -> None:
    """What the MLflow UI does when a user adds a tag to a model version."""
    body = json.dumps({"name": name, "version": version, "key": key, "value": value}).encode()
    req = urllib.request.Request(
        f"{mlflow_url}/api/2.0/mlflow/model-versions/set-tag",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200


def post(
    port: int, body: bytes, headers: dict[str, str], *, content_length: int | None = None
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/webhook")
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.putheader("Content-Length", str(len(body) if content_length is None else content_length))
    conn.endheaders()
    if content_length is None:
        conn.send(body)
    resp = conn.getresponse()
    payload = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, payload


def signed(
    body: bytes, *, secret: str = SECRET, delivery_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    delivery_id = delivery_id or str(uuid.uuid4())
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": signature.sign(secret, delivery_id, ts, body),
    }


def tag_event(name: str, version: str, key: str, value: str) -> bytes:
    return json.dumps(
        {
            "entity": "model_version_tag",
            "action": "set",
            "timestamp": "2026-11-26T00:00:00+00:00",
            "data": {"name": name, "version": version, "key": key, "value": value},
        }
    ).encode()


def wait_until(predicate: Callable[[], Any], timeout: float) -> Any:
    """The predicate's first truthy value within ``timeout`` seconds, else None."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def mlflow_env(mlflow_server, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return mlflow_server.url


@pytest.fixture
def parent_version(mlflow_env: str, tiny_parent_factory) -> tuple[str, str]:

    name = f"tiny-parent-{uuid.uuid4().hex[:6]}"
    return name, register_parent(tiny_parent_factory("llama"), name)


@pytest.fixture
def recording_service(
    mlflow_env: str, tmp_path: Path
) -> Iterator[tuple[Any, RecordingBackend, TriggerServer]]:
    settings = TriggerSettings(
        tracking_uri=mlflow_env,
        secret=SECRET,
        state_db=str(tmp_path / "state.sqlite"),
        reconcile_interval_s=0,
        max_body_bytes=4096,
    )
    backend = RecordingBackend()
    service = build_service(settings, backend)
    server = TriggerServer(service, "127.0.0.1", 0).start()
    yield service, backend, server
    server.stop()


# --------------------------------------------------------------------------- security


def test_json_logs_carry_the_extras_and_never_a_secret() -> None:
    import logging

    from pipelines.trigger.logs import JsonFormatter

    record = logging.LogRecord("pipelines.trigger", logging.INFO, __file__, 1, "run submitted", None, None)
    record.run_id, record.secret, record.signature = "local-1", SECRET, "v1,abc"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "run submitted" and entry["run_id"] == "local-1" and entry["level"] == "info"
    assert SECRET not in json.dumps(entry) and entry["secret"] == entry["signature"] == "[redacted]"


@pytest.mark.integration
def test_forged_stale_replayed_malformed_and_oversized_deliveries_start_nothing(
    recording_service, parent_version: tuple[str, str], tmp_path: Path, caplog
) -> None:
    caplog.set_level("DEBUG", logger="pipelines.trigger")
    service, backend, server = recording_service
    name, version = parent_version
    good = tag_event(name, version, "puzzle.request", "default")

    # Control: a correctly signed delivery submits one run (so the rejections below are not vacuous).
    headers = signed(good)
    assert post(server.port, good, headers) == (200, {"status": "submitted", "run_id": "rec-1"})
    assert len(backend.requests) == 1 and backend.requests[0].parent_uri == f"models:/{name}/{version}"

    other = tag_event(name, version, "puzzle.request", "default")
    forged = {**signed(other), "X-MLflow-Signature": "v1," + "A" * 44}
    stale = int(time.time()) - 301
    cases = {
        "replayed delivery": (good, headers, 200, "duplicate"),
        "forged signature": (other, forged, 401, "invalid signature"),
        "wrong secret": (other, signed(other, secret="not-the-secret"), 401, "invalid signature"),
        "missing signature": (
            other,
            {k: v for k, v in signed(other).items() if k != "X-MLflow-Signature"},
            401,
            "missing",
        ),
        "stale timestamp": (other, signed(other, timestamp=stale), 401, "window"),
        "future timestamp": (other, signed(other, timestamp=int(time.time()) + 3600), 401, "window"),
        "unknown event": (
            (
                ev := json.dumps(
                    {
                        "entity": "registered_model",
                        "action": "created",
                        "data": {"name": name, "version": version},
                    }
                ).encode()
            ),
            signed(ev),
            400,
            "unsupported event",
        ),
        "malformed JSON": (
            b'{"entity": "model_version_tag", "action": ',
            signed(b'{"entity": "model_version_tag", "action": '),
            400,
            "malformed JSON",
        ),
        "no model version": (
            (nv := json.dumps({"entity": "model_version_tag", "action": "set", "data": {}}).encode()),
            signed(nv),
            400,
            "name",
        ),
    }
    for label, (body, hdrs, status, reason) in cases.items():
        got_status, got = post(server.port, body, hdrs)
        assert got_status == status, f"{label}: {got_status} {got}"
        assert reason in json.dumps(got), f"{label}: {got}"
    # Oversized: answered from the Content-Length alone, before any byte of the body is read.
    assert post(server.port, b"", signed(b"x"), content_length=10 * 1024 * 1024)[0] == 413
    big = tag_event(name, version, "puzzle.request", "x" * 5000)
    assert post(server.port, big, signed(big))[0] == 413
    assert len(backend.requests) == 1, "a rejected delivery reached the backend"

    # Tags the service writes back are events too, and never trigger anything.
    for key in (TAG_STATE, TAG_RUN_ID, TAG_PROFILE, "other.tag"):
        body = tag_event(name, version, key, "default")
        assert post(server.port, body, signed(body))[1]["status"] == "ignored"
    # Setting the same request again while its run is settled submits nothing new.
    again = tag_event(name, version, "puzzle.request", "default")
    assert post(server.port, again, signed(again))[1]["status"] == "already_requested"
    assert len(backend.requests) == 1

    # The delivery ids are persisted: a restarted service still refuses the replay.
    server.stop()
    restarted = build_service(service.settings, backend)
    assert restarted.handle_delivery(headers, good).body == {"status": "duplicate"}
    assert len(backend.requests) == 1
    counts = service.stats.snapshot()
    assert counts["rejected_401"] == 5 and counts["rejected_400"] == 3 and counts["rejected_413"] == 2
    # Every rejection was logged, and no log line holds the secret or a signature.
    assert sum("delivery rejected" in r.getMessage() for r in caplog.records) == 10
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert SECRET not in logged and headers["X-MLflow-Signature"] not in logged


@pytest.mark.integration
def test_unknown_profile_is_rejected_on_the_version(
    recording_service, parent_version: tuple[str, str]
) -> None:
    service, backend, server = recording_service
    name, version = parent_version
    body = tag_event(name, version, "puzzle.request", "no-such-profile")
    status, payload = post(server.port, body, signed(body))
    assert status == 200 and payload["status"] == "rejected" and "unknown profile" in payload["reason"]
    tags = service.client.get_model_version(name, version).tags
    assert tags[TAG_STATE] == "rejected" and "known: default" in tags["puzzle.error"]
    assert backend.requests == []


@pytest.mark.integration
def test_reconcile_submits_lost_requests_once_and_repairs_after_a_crash(
    recording_service, parent_version: tuple[str, str], tiny_parent_factory, mlflow_env: str
) -> None:
    from mlflow import MlflowClient

    service, backend, _server = recording_service
    name, version = parent_version
    client = MlflowClient(mlflow_env)
    # No webhook is registered for this service: the request tag is "lost".
    client.set_model_version_tag(name, version, "puzzle.request", "default")
    outcomes = service.reconcile()
    assert [(o["model"], o["status"]) for o in outcomes] == [(name, "submitted")]
    assert service.reconcile() == []
    assert len(backend.requests) == 1
    assert client.get_model_version(name, version).tags[TAG_RUN_ID] == "rec-1"

    # A crash after submitting but before tagging: the store knows the run, the version does not.
    crashed = register_parent(tiny_parent_factory("llama"), f"{name}-crash")
    submission = service.store.begin_submission(f"{name}-crash", crashed, "default", "recording", "webhook:x")
    service.store.complete_submission(submission, "rec-before-crash")
    client.set_model_version_tag(f"{name}-crash", crashed, "puzzle.request", "default")
    assert [o["status"] for o in service.reconcile()] == ["repaired"]
    assert client.get_model_version(f"{name}-crash", crashed).tags[TAG_RUN_ID] == "rec-before-crash"
    assert len(backend.requests) == 1


@pytest.mark.integration
def test_register_webhook_is_idempotent(mlflow_env: str) -> None:
    from mlflow import MlflowClient

    from pipelines.trigger.webhooks import register_webhook

    client = MlflowClient(mlflow_env)
    name = f"hook-{uuid.uuid4().hex[:6]}"
    first = register_webhook(client, "http://127.0.0.1:9/webhook", SECRET, name=name)
    second = register_webhook(client, "http://127.0.0.1:10/webhook", SECRET, name=name)
    assert first.created and not second.created and first.webhook_id == second.webhook_id
    hooks = [h for h in client.list_webhooks() if h.name == name]
    assert len(hooks) == 1 and hooks[0].url == "http://127.0.0.1:10/webhook"
    assert sorted(str(e) for e in hooks[0].events) == ["model_version_alias.created", "model_version_tag.set"]
    client.delete_webhook(first.webhook_id)


# --------------------------------------------------------------------------- end to end


def tiny_profile(corpus: Path) -> str:
    """A tiny run (the budgets of tests/test_run.py, no baselines): seconds per phase on CPU."""
    return f"""\
device: cpu
data: {{source: {json.dumps(str(corpus))}, seq_len: 32,
       splits: {{calibration: 8, bld: 16, score: 4, gkd: 16, eval: 8}}}}
library: {{kv_heads: null, attention_linear: true, attention_noop: true, ffn_fractions: [1.0, 0.5],
          ffn_linear: false, ffn_noop: true}}
bld: {{token_budget: 128, batch_size: 4}}
scoring: {{batch_size: 4}}
costs: {{batch_sizes: [1], prompt_len: 8, gen_len: 8, repeats: 1}}
search: {{constraints: ["parameters<=0.85x"], num_solutions: 1}}
gkd: {{token_budget: 512, batch_size: 4}}
evaluate: {{batch_size: 4, repeats: 1, bootstrap: 100}}
tracking: {{uri: null, experiment: puzzle-trigger-e2e}}
registry: {{gates: {{min_accuracy_kept: 0.0, min_speedup: 0.0}}}}
baselines: {{methods: [], gkd: false}}
"""


@pytest.mark.integration
def test_tagging_a_parent_version_in_mlflow_runs_puzzle_once_and_registers_the_child(
    mlflow_env: str, tiny_parent_factory, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from pipelines.trigger.backends import LocalBackend
    from pipelines.trigger.webhooks import register_webhook
    from puzzle.mlflow import registry, tracking

    name = f"tiny-parent-{uuid.uuid4().hex[:6]}"
    # The parent of tests/test_run.py (an FFN of 512 channels, so that 0.5 is a real narrower width).
    version = register_parent(tiny_parent_factory("llama", intermediate_size=512), name)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(STDLIB_TEXT * 3)
    (profiles / "tiny.yaml").write_text(tiny_profile(corpus))
    settings = TriggerSettings(
        tracking_uri=mlflow_env,
        secret=SECRET,
        state_db=str(tmp_path / "state.sqlite"),
        profiles_dir=str(profiles),
        reconcile_interval_s=0,
        work_dir=str(tmp_path / "runs"),
    )
    backend = LocalBackend(settings.work_dir, mlflow_env)
    service = build_service(settings, backend)
    deliveries: list[tuple[dict[str, str], bytes]] = []
    handle = service.handle_delivery

    def recording(headers: dict[str, str], body: bytes, **kwargs: Any) -> Any:
        deliveries.append((headers, body))
        return handle(headers, body, **kwargs)

    service.handle_delivery = recording  # type: ignore[method-assign]
    server = TriggerServer(service, "127.0.0.1", 0).start()
    client = MlflowClient(mlflow_env)
    hook = register_webhook(client, f"http://127.0.0.1:{server.port}/webhook", SECRET, name=f"e2e-{name}")
    try:
        # MLflow caches its list of webhooks (MLFLOW_WEBHOOK_CACHE_TTL): an event in the same second
        # as the registration may find none and is never delivered. Wait until MLflow delivers an
        # event that requests nothing, then make the request: no race with the cache's clock.
        def warmed_up() -> bool:
            set_tag_via_rest(mlflow_env, name, version, "warm-up", uuid.uuid4().hex)
            return bool(wait_until(lambda: deliveries, 1.0))

        wait_for(warmed_up, 60, "MLflow to deliver its first event to the new webhook")
        assert service.store.submissions() == []  # a tag that requests nothing submits nothing
        # What the user does in the UI: add the tag puzzle.request=tiny to the parent version.
        set_tag_via_rest(mlflow_env, name, version, "puzzle.request", "tiny")
        submissions = wait_for(service.store.submissions, 60, "MLflow to deliver the webhook")
        run_id = submissions[0].run_id
        assert run_id.startswith("local-")
        code = backend.wait(run_id, timeout=300)
        log = backend.log_path(run_id).read_text(errors="replace")
        assert code == 0, log[-4000:]

        parent_tags = client.get_model_version(name, version).tags
        assert parent_tags[TAG_RUN_ID] == run_id
        assert parent_tags[TAG_PROFILE] == "tiny" and parent_tags[TAG_STATE] == "succeeded"
        child_name, child_version, _ = registry.parse_models_uri(parent_tags[TAG_CHILD])
        assert child_name == f"{name}-puzzle"
        child = client.get_model_version(child_name, child_version)
        # The gate ran: with targets 0/0 it passes exactly when both figures exist. A random tiny
        # parent may predict no token of the text right, and then accuracy kept is undefined.
        passed = registry.TAG_ACCURACY_KEPT in child.tags
        assert child.tags[registry.TAG_GATE] == ("passed" if passed else "failed")
        assert sorted(child.aliases) == (["candidate", "champion"] if passed else ["candidate"])
        assert child.tags[registry.TAG_PARENT_URI] == f"models:/{name}/{version}"
        assert child.tags[registry.TAG_PARENT_VERSION] == version
        assert child.tags[registry.TAG_KFP_RUN_ID] == run_id and child.tags[registry.TAG_PROFILE] == "tiny"
        assert json.loads(child.tags[registry.TAG_CONSTRAINTS]) == ["parameters<=0.85x"]
        assert float(child.tags[registry.TAG_SPEEDUP]) > 0

        # The run itself was tracked, tagged with its run id.
        experiment = client.get_experiment_by_name("puzzle-trigger-e2e")
        pipeline_run = tracking.find_kfp_run(client, experiment.experiment_id, run_id)
        assert pipeline_run is not None and child.tags[registry.TAG_PIPELINE_RUN] == pipeline_run.info.run_id
        assert client.get_run(pipeline_run.info.run_id).info.status == "FINISHED"
        nested = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{pipeline_run.info.run_id}'",
        )
        phases = {r.data.tags.get(tracking.TAG_PHASE): r.info.run_id for r in nested}
        assert {"convert", "bld", "scoring", "costs", "search", "gkd", "evaluate", "export"} <= set(phases)
        tables = {
            phase: {a.path for a in client.list_artifacts(phases[phase], "tables")}
            for phase in ("scoring", "search")
        }
        assert "tables/scores.json" in tables["scoring"] and "tables/solutions.json" in tables["search"]
        assert any(
            a.path.startswith("tables/costs_") for a in client.list_artifacts(phases["costs"], "tables")
        )
        assert len(client.get_metric_history(phases["gkd"], "gkd/loss")) >= 2
        assert "speedup" in client.get_run(pipeline_run.info.run_id).data.metrics

        # Exactly one run: the service's own tag writes came back as webhooks and were ignored,
        # and MLflow's delivery replayed by an attacker (or a retry) starts nothing.
        request_deliveries = [(h, b) for h, b in deliveries if b'"puzzle.request"' in b]
        assert len(request_deliveries) == 1
        replay = post(server.port, request_deliveries[0][1], request_deliveries[0][0])
        assert replay == (200, {"status": "duplicate"})
        assert len(service.store.submissions()) == 1
        assert service.stats.snapshot().get("ignored", 0) >= 3
        health = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10).read()
        )
        assert health["status"] == "ok" and health["counts"]["submitted_runs"] == 1
    finally:
        client.delete_webhook(hook.webhook_id)
        server.stop()
        backend.stop_all()


@pytest.mark.integration
def test_a_tag_added_in_the_mlflow_ui_reaches_the_trigger_service(
    recording_service, parent_version: tuple[str, str], mlflow_env: str
) -> None:
    """The user's path: the MLflow UI in headless Chromium -> MLflow's webhook -> one submission."""
    from mlflow import MlflowClient
    from mlflow_ui import add_model_version_tag_in_ui, chromium_binary

    from pipelines.trigger.webhooks import register_webhook

    if chromium_binary() is None:
        pytest.skip("Debian's chromium is not installed (make test installs it where apt-get is usable)")
    service, backend, server = recording_service
    name, version = parent_version
    client = MlflowClient(mlflow_env)
    hook = register_webhook(client, f"http://127.0.0.1:{server.port}/webhook", SECRET, name=f"ui-{name}")
    try:
        add_model_version_tag_in_ui(mlflow_env, name, version, "puzzle.request", "default")
        wait_for(lambda: backend.requests, 120, "the UI's tag to reach the trigger service")
        assert [r.parent_uri for r in backend.requests] == [f"models:/{name}/{version}"]
        tags = wait_for(
            lambda: (t := client.get_model_version(name, version).tags).get(TAG_RUN_ID) and t, 30, "tags"
        )
        assert tags[TAG_RUN_ID] == "rec-1" and tags[TAG_STATE] == "submitted"
    finally:
        client.delete_webhook(hook.webhook_id)


@pytest.mark.integration
def test_trigger_cli_registers_parent_and_webhook_and_refuses_missing_secret(
    mlflow_env: str, tiny_parent_factory, monkeypatch, capsys
) -> None:
    from puzzle.cli import main

    name = f"cli-parent-{uuid.uuid4().hex[:6]}"
    parent = str(tiny_parent_factory("llama"))
    assert main(["trigger", "register-parent", parent, "--name", name]) == 0
    assert main(["trigger", "register-parent", parent, "--name", name]) == 0
    out = capsys.readouterr().out
    assert f"registered: models:/{name}/1" in out and f"already registered: models:/{name}/1" in out

    monkeypatch.delenv("PUZZLE_TRIGGER_SECRET", raising=False)
    hook = f"cli-hook-{uuid.uuid4().hex[:6]}"
    assert main(["trigger", "register-webhook", "--url", "http://127.0.0.1:9/webhook", "--name", hook]) == 2
    assert "no webhook secret" in capsys.readouterr().err
    monkeypatch.setenv("PUZZLE_TRIGGER_SECRET", SECRET)
    assert main(["trigger", "register-webhook", "--url", "http://127.0.0.1:9/webhook", "--name", hook]) == 0
    assert main(["trigger", "register-webhook", "--url", "http://127.0.0.1:9/webhook", "--name", hook]) == 0
    out = capsys.readouterr().out
    assert out.count("created") == 1 and out.count("updated") == 1 and SECRET not in out
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_env)
    for h in client.list_webhooks():
        if h.name == hook:
            client.delete_webhook(h.webhook_id)


@pytest.mark.integration
def test_puzzle_trigger_serve_answers_health_checks_and_logs_json(mlflow_env: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from servers import free_port

    port = free_port()
    env = {**os.environ, "PUZZLE_TRIGGER_SECRET": SECRET, "MLFLOW_TRACKING_URI": mlflow_env}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "puzzle"),
            "trigger",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--state-db",
            str(tmp_path / "state.sqlite"),
            "--reconcile-interval",
            "0",
            "--work-dir",
            str(tmp_path / "runs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:

        def healthy() -> dict | None:
            try:
                return json.loads(
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                )
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                return None

        health = wait_for(healthy, 60, "puzzle trigger serve to answer /healthz")
        assert health["status"] == "ok" and health["backend"] == "local"
        body = tag_event("m", "1", "puzzle.request", "default")
        assert post(port, body, signed(body, secret="wrong"))[0] == 401
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-2000:]  # SIGTERM is a clean shutdown
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(e["msg"] == "trigger service listening" and e["port"] == port for e in lines)
    assert any(e["msg"] == "delivery rejected" and e["status"] == 401 for e in lines)
    assert SECRET not in stderr


@pytest.mark.integration
def test_the_request_alias_runs_the_alias_profile_and_other_aliases_do_nothing(
    recording_service, parent_version: tuple[str, str], mlflow_env: str
) -> None:
    from mlflow import MlflowClient

    from pipelines.trigger.webhooks import register_webhook

    service, backend, server = recording_service
    name, version = parent_version
    client = MlflowClient(mlflow_env)
    hook = register_webhook(client, f"http://127.0.0.1:{server.port}/webhook", SECRET, name=f"alias-{name}")
    try:
        client.set_registered_model_alias(name, "champion", version)  # not the request alias
        wait_for(lambda: service.stats.snapshot().get("ignored", 0) >= 1, 60, "the champion alias's webhook")
        assert backend.requests == []
        client.set_registered_model_alias(name, "puzzle-request", version)
        wait_for(lambda: backend.requests, 60, "the request alias's webhook")
        assert [(r.parent_uri, r.profile) for r in backend.requests] == [
            (f"models:/{name}/{version}", "default")
        ]
    finally:
        client.delete_webhook(hook.webhook_id)
    # A signed event for a version that does not exist is answered, not retried forever.
    body = tag_event(name, "999", "puzzle.request", "default")
    assert post(server.port, body, signed(body)) == (
        200,
        {"status": "ignored", "reason": f"model version {name}/999 does not exist"},
    )
    assert len(backend.requests) == 1
