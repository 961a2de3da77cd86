"""Trigger service figures (CPU): webhook latency from a tag set in MLflow to a submitted run, and
how many deliveries per second the service verifies.

Starts a SeaweedFS S3 server and an MLflow server (as the tests do), registers parent versions,
points an MLflow webhook at an in-process trigger service whose backend only counts submissions
(so the figure is MLflow + verification + decision, not a Puzzle run), then:

* latency: for each of ``--versions`` parent versions, set ``puzzle.request`` through the REST API
  and time until the service has submitted (median, p95, max);
* throughput: ``--deliveries`` signed deliveries over one keep-alive HTTP connection, for an
  ignored tag (verification, replay store, JSON, decision) and for forged signatures (rejected
  after the HMAC check), deliveries per second.

    python benchmarks/bench_trigger.py --versions 20 --deliveries 2000
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

SECRET = "bench-secret"


class CountingBackend:
    name = "counting"

    def __init__(self) -> None:
        self.submitted: dict[tuple[str, str], float] = {}

    def submit(self, request) -> str:  # noqa: ANN001 - RunRequest
        self.submitted[(request.model, request.version)] = time.perf_counter()
        return f"bench-{len(self.submitted)}"


def set_tag(url: str, name: str, version: str, key: str, value: str) -> None:
    body = json.dumps({"name": name, "version": version, "key": key, "value": value}).encode()
    req = urllib.request.Request(
        f"{url}/api/2.0/mlflow/model-versions/set-tag",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=30).read()


def throughput(port: int, n: int, *, forged: bool) -> float:
    from pipelines.trigger import signature

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    for i in range(n):
        body = json.dumps(
            {
                "entity": "model_version_tag",
                "action": "set",
                "data": {"name": "m", "version": "1", "key": "other.tag", "value": str(i)},
            }
        ).encode()
        delivery, ts = str(uuid.uuid4()), str(int(time.time()))
        sig = "v1," + "A" * 44 if forged else signature.sign(SECRET, delivery, ts, body)
        conn.request(
            "POST",
            "/webhook",
            body=body,
            headers={
                "Content-Type": "application/json",
                "X-MLflow-Delivery-Id": delivery,
                "X-MLflow-Timestamp": ts,
                "X-MLflow-Signature": sig,
            },
        )
        resp = conn.getresponse()
        resp.read()
        expected = 401 if forged else 200
        if resp.status != expected:
            raise RuntimeError(f"delivery {i}: HTTP {resp.status}, expected {expected}")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--deliveries", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from mlflow import MlflowClient
    from mlflow_server import start_mlflow
    from servers import apply_env, start_seaweedfs

    from pipelines.trigger import build_service
    from pipelines.trigger.server import TriggerServer
    from pipelines.trigger.settings import TriggerSettings
    from pipelines.trigger.webhooks import register_webhook

    work = Path(tempfile.mkdtemp(prefix="bench-trigger-"))
    s3 = start_seaweedfs(work / "s3")
    s3.client().create_bucket(Bucket="mlflow")
    mlflow = start_mlflow(work / "mlflow", s3, "mlflow")
    apply_env({**s3.env(), "MLFLOW_TRACKING_URI": mlflow.url})
    try:
        client = MlflowClient(mlflow.url)
        name = "bench-parent"
        client.create_registered_model(name)
        run = client.create_run("0")
        client.set_terminated(run.info.run_id)
        versions = [
            client.create_model_version(name, source=run.info.artifact_uri, run_id=run.info.run_id).version
            for _ in range(args.versions)
        ]
        backend = CountingBackend()
        settings = TriggerSettings(
            tracking_uri=mlflow.url,
            secret=SECRET,
            state_db=str(work / "state.sqlite"),
            reconcile_interval_s=0,
            window_s=300,
        )
        server = TriggerServer(build_service(settings, backend), "127.0.0.1", 0).start()
        register_webhook(client, f"http://127.0.0.1:{server.port}/webhook", SECRET)
        time.sleep(2)  # let MLflow's webhook cache (TTL 1 s) see the new webhook

        latencies = []
        for version in versions:
            start = time.perf_counter()
            set_tag(mlflow.url, name, str(version), "puzzle.request", "default")
            deadline = time.time() + 60
            while (name, str(version)) not in backend.submitted:
                if time.time() > deadline:
                    raise RuntimeError(f"version {version}: no submission within 60 s")
                time.sleep(0.005)
            latencies.append(backend.submitted[(name, str(version))] - start)
        latencies.sort()
        p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
        accepted = throughput(server.port, args.deliveries, forged=False)
        rejected = throughput(server.port, args.deliveries, forged=True)
        server.stop()
        print(
            f"tag set (REST) -> run submitted, {len(latencies)} versions: "
            f"median {statistics.median(latencies) * 1000:.0f} ms, "
            f"p95 {p95 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
        )
        print(f"verified deliveries (ignored tag), {args.deliveries} over one connection: {accepted:.0f}/s")
        print(f"forged deliveries (401 after the HMAC check), {args.deliveries}: {rejected:.0f}/s")
    finally:
        mlflow.stop()
        s3.stop()


if __name__ == "__main__":
    main()
