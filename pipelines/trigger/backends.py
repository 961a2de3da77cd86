"""Where a requested run goes: Kubeflow Pipelines (production) or a local process (development).

A backend's ``submit`` starts the run and returns its id at once; it never waits for the run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from puzzle.config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunRequest:
    """One requested Puzzle run: the parent version, the profile and its validated config."""

    model: str
    version: str
    profile: str
    config: RunConfig
    child_model: str
    """The registered model the child is registered under."""

    @property
    def parent_uri(self) -> str:
        return f"models:/{self.model}/{self.version}"

    @property
    def run_name(self) -> str:
        return f"puzzle-{self.model}-v{self.version}-{self.profile}"


class Backend(Protocol):
    name: str

    def submit(self, request: RunRequest) -> str:
        """Start the run; returns its id (KFP run id, or ``local-...``)."""
        ...


# --------------------------------------------------------------------------- local


class LocalBackend:
    """Runs each request as ``python -m pipelines.trigger.local_job`` in a child process.

    The job runs ``puzzle run`` on the profile's config (parent = the requesting version,
    output under ``work_dir/<run id>/``), registers the child with lineage, applies the gate and
    writes the outcome back as tags on the parent version. For development and tests: it has
    no queue beyond ``max_parallel`` processes and no retries.
    """

    name = "local"

    def __init__(
        self,
        work_dir: str | Path,
        tracking_uri: str,
        *,
        max_parallel: int = 1,
        env: dict[str, str] | None = None,
    ):
        self.work_dir = Path(work_dir).resolve()
        self.tracking_uri = tracking_uri
        self.env = dict(env or {})
        self._slots = threading.BoundedSemaphore(max_parallel)
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def submit(self, request: RunRequest) -> str:
        run_id = f"local-{uuid.uuid4().hex[:12]}"
        run_dir = self.work_dir / run_id
        run_dir.mkdir(parents=True, exist_ok=False)
        config = request.config.replace(output=str(run_dir / "output"))
        (run_dir / "config.yaml").write_text(config.to_yaml())
        job = {
            "run_id": run_id,
            "model": request.model,
            "version": request.version,
            "profile": request.profile,
            "parent_uri": request.parent_uri,
            "child_model": request.child_model,
            "config": str(run_dir / "config.yaml"),
            "tracking_uri": self.tracking_uri,
            "experiment": config.tracking.experiment,
        }
        (run_dir / "job.json").write_text(json.dumps(job, indent=2))
        thread = threading.Thread(
            target=self._run, args=(run_id, run_dir), name=f"local-run-{run_id}", daemon=True
        )
        with self._lock:
            self._threads[run_id] = thread
        thread.start()
        return run_id

    def _run(self, run_id: str, run_dir: Path) -> None:
        env = {
            **os.environ,
            **self.env,
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "KFP_RUN_ID": run_id,
            "PYTHONUNBUFFERED": "1",
        }
        with self._slots, open(run_dir / "job.log", "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipelines.trigger.local_job", str(run_dir / "job.json")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=run_dir,
            )
            with self._lock:
                self._procs[run_id] = proc
            code = proc.wait()
        log.info("local run finished", extra={"run_id": run_id, "exit_code": code})

    def wait(self, run_id: str, timeout: float | None = None) -> int | None:
        """Wait for a local run; its exit code (None when still running after ``timeout``)."""
        with self._lock:
            thread = self._threads.get(run_id)
        if thread is None:
            raise KeyError(f"no local run {run_id}")
        thread.join(timeout)
        with self._lock:
            proc = self._procs.get(run_id)
        return None if thread.is_alive() or proc is None else proc.returncode

    def log_path(self, run_id: str) -> Path:
        return self.work_dir / run_id / "job.log"

    def stop_all(self, timeout: float = 10.0) -> None:
        """Terminate running jobs (service shutdown)."""
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()


# --------------------------------------------------------------------------- Kubeflow


class KfpBackend:
    """Submits the compiled pipeline to Kubeflow Pipelines, the way ``puzzle pipeline submit`` does.

    Arguments come from the profile's config (:func:`pipelines.parameters.pipeline_arguments`),
    with the requesting version as parent, the children's registered model and the profile;
    the config's ``output`` (on S3) is the run's pipeline root. Inside the cluster the client
    authenticates with the pod's service-account token (:func:`pipelines.client.connect`).
    """

    name = "kfp"

    def __init__(
        self,
        host: str,
        pipeline_package: str | Path,
        *,
        namespace: str | None = None,
        experiment: str = "puzzle",
        serving_uri: str = "",
        gpu_product: str | None = None,
        token: str | None = None,
        client_factory: Any = None,
    ) -> None:
        self.host = host
        self.pipeline_package = str(pipeline_package)
        if not Path(self.pipeline_package).is_file():
            raise FileNotFoundError(
                f"pipeline package {self.pipeline_package} does not exist: run `puzzle pipeline compile`"
            )
        self.namespace = namespace
        self.experiment = experiment
        self.serving_uri = serving_uri
        self.gpu_product = gpu_product
        self.token = token
        self._client_factory = client_factory

    def _client(self) -> Any:
        if self._client_factory is not None:
            return self._client_factory()
        from pipelines.client import connect

        return connect(self.host, namespace=self.namespace, token=self.token)

    def arguments(self, request: RunRequest) -> dict[str, Any]:
        from pipelines.parameters import pipeline_arguments

        return pipeline_arguments(
            request.config,
            serving_uri=self.serving_uri,
            gpu_product=self.gpu_product,
            profile=request.profile,
        )

    def submit(self, request: RunRequest) -> str:
        from pipelines.client import submit

        return submit(
            self._client(),
            request.config,
            self.arguments(request),
            package=self.pipeline_package,
            experiment=self.experiment,
            namespace=self.namespace,
            run_name=request.run_name,
        )
