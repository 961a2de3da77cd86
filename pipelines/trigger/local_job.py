"""One run of the local backend: ``python -m pipelines.trigger.local_job JOB.json``.

``puzzle run`` (:func:`puzzle.run.run`) on the request's config, then the child's registration
(alias ``candidate``, lineage tags), the gate (``champion`` when the targets are met), and the
outcome written back on the parent version: ``puzzle.state`` (running -> succeeded | failed), ``puzzle.child``
(``models:/CHILD/VERSION``) or ``puzzle.error``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.trigger.settings import TAG_CHILD, TAG_ERROR, TAG_RUN_ID, TAG_STATE

log = logging.getLogger("pipelines.trigger.local_job")


def run_job(job: dict[str, Any]) -> str:
    """Run the job; returns the registered child's ``models:/`` URI."""
    from puzzle.config import load_config
    from puzzle.mlflow import registry
    from puzzle.run import run

    config = load_config(job["config"])
    result = run(config)
    figures = registry.figures_from_evaluation(result.evaluation_uri)
    lineage = registry.Lineage(
        parent_uri=job["parent_uri"],
        constraints=list(config.search.constraints),
        accuracy_kept=figures.get("accuracy_kept"),
        speedup=figures.get("speedup"),
        pipeline_run_id=_pipeline_run_id(job, config.tracking.experiment),
        kfp_run_id=job["run_id"],
        profile=job["profile"],
    )
    # `puzzle run` registered the child already when the config names a registered model; this
    # returns that version (same content) and adds the lineage only the trigger knows.
    registration = registry.register_child(
        result.export_uri,
        job["child_model"],
        lineage,
        tracking_uri=job["tracking_uri"],
        experiment=config.tracking.experiment,
    )
    gates = config.registry.gates
    registry.promote(
        registration.name,
        registration.version,
        min_accuracy_kept=gates.min_accuracy_kept,
        min_speedup=gates.min_speedup,
        tracking_uri=job["tracking_uri"],
    )
    return registration.uri


def _pipeline_run_id(job: dict[str, Any], experiment: str) -> str | None:
    """The MLflow run ``puzzle run`` logged to (tagged with this job's run id), if any."""
    from puzzle.mlflow import tracking

    client = tracking.client_for(job["tracking_uri"])
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    run = tracking.find_kfp_run(client, exp.experiment_id, job["run_id"])
    return run.info.run_id if run else None


def _close_tracking(job: dict[str, Any], status: str) -> None:
    """End the MLflow run of this job: runs tagged with a run id are left open by ``puzzle run``
    (in Kubeflow the exit handler closes them; here the job is the exit handler)."""
    from puzzle.mlflow import tracking

    try:
        tracking.finish_pipeline_run(
            job["run_id"],
            status,
            tracking_uri=job["tracking_uri"],
            experiment=job.get("experiment", "puzzle"),
        )
    except Exception:  # noqa: BLE001 - the outcome tags on the parent version matter more
        log.exception("could not close the MLflow run of %s", job["run_id"])


def main(argv: list[str] | None = None) -> int:
    from puzzle.mlflow import tracking

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.trigger.local_job JOB.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(args[0]).read_text())
    client = tracking.client_for(job["tracking_uri"])

    def tag(key: str, value: str) -> None:
        client.set_model_version_tag(job["model"], job["version"], key, value)

    # The service tags the version "submitted" right after starting this process; wait for it, so
    # that "running" is never overwritten by that earlier state.
    deadline = time.time() + 60
    while (
        client.get_model_version(job["model"], job["version"]).tags.get(TAG_RUN_ID) != job["run_id"]
        and time.time() < deadline
    ):
        time.sleep(0.5)
    tag(TAG_STATE, "running")
    try:
        child_uri = run_job(job)
    except BaseException as exc:
        log.exception("run %s failed", job["run_id"])
        _close_tracking(job, "FAILED")
        tag(TAG_ERROR, f"{type(exc).__name__}: {exc}"[:500])
        tag(TAG_STATE, "failed")
        return 1
    _close_tracking(job, "FINISHED")
    tag(TAG_CHILD, child_uri)
    tag(TAG_STATE, "succeeded")
    log.info("run %s succeeded: %s", job["run_id"], child_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
