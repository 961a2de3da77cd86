"""A real MLflow tracking server for the tests: SQLite backend, artifacts proxied to SeaweedFS S3.

Webhooks are enabled for loopback delivery (http scheme, private IPs) with a fixed Fernet key, and
the webhook cache TTL is 1 s so that a webhook registered by a test fires at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from servers import S3Server, free_port, wait_for_port


@dataclass
class MlflowServer:
    url: str
    bucket: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def artifact_root(self) -> str:
        """Where the server writes artifacts (the S3 prefix behind ``mlflow-artifacts:/``)."""
        return f"s3://{self.bucket}/mlflow"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Stop the server and the worker processes it started (its own process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def mlflow_binary() -> str:
    candidate = Path(sys.executable).parent / "mlflow"
    return str(candidate) if candidate.exists() else "mlflow"


def start_mlflow(workdir: Path, s3: S3Server, bucket: str, *, timeout: float = 120.0) -> MlflowServer:
    """Start ``mlflow server`` on a free loopback port and wait until ``/health`` answers."""
    from cryptography.fernet import Fernet

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        **s3.env(),
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        "MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [
        mlflow_binary(),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{bucket}/mlflow",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log_path = workdir / "mlflow.log"
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
    )
    server = MlflowServer(f"http://127.0.0.1:{port}", bucket, proc, log_path)
    try:
        wait_for_port(port, timeout=timeout, proc=proc)
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("MLflow server did not become healthy")
            time.sleep(0.3)
    except Exception as exc:
        server.stop()
        raise RuntimeError(f"MLflow server did not start: {exc}\n{server.log_tail()}") from exc
    return server
