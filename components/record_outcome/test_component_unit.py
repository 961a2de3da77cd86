"""The exit handler records how the run ended on its MLflow run and closes it."""

from __future__ import annotations

import uuid

import pytest
from kfp import dsl

from components.record_outcome.component import record_outcome

pytestmark = pytest.mark.integration


def _status(state: str, error: str | None = None) -> dsl.PipelineTaskFinalStatus:
    return dsl.PipelineTaskFinalStatus(
        state=state,
        pipeline_job_resource_name="projects/p/runs/r",
        pipeline_task_name="exit-handler-1",
        error_code=1 if error else None,
        error_message=error,
    )


def test_a_failed_run_is_recorded_as_failed(tracking_server) -> None:
    from mlflow import MlflowClient

    from puzzle.mlflow import tracking

    kfp_run_id = f"kfp-{uuid.uuid4().hex[:8]}"
    with tracking.pipeline_run(
        name="unit", tracking_uri=tracking_server, experiment="unit-outcome", kfp_run_id=kfp_run_id
    ) as run:
        run_id = run.run_id

    result = record_outcome.python_func(
        status=_status("FAILED", "Task gkd failed: CUDA out of memory"),
        kfp_run_id=kfp_run_id,
        tracking_config={"uri": tracking_server, "experiment": "unit-outcome"},
    )

    assert result == "FAILED"
    mlflow_run = MlflowClient(tracking_uri=tracking_server).get_run(run_id)
    assert mlflow_run.info.status == "FAILED"
    assert mlflow_run.data.tags["puzzle.outcome"] == "FAILED"
    assert "CUDA out of memory" in mlflow_run.data.tags["puzzle.error"]


def test_an_outcome_without_an_mlflow_run_yet_creates_one(tracking_server) -> None:
    from mlflow import MlflowClient

    kfp_run_id = f"kfp-{uuid.uuid4().hex[:8]}"
    assert (
        record_outcome.python_func(
            status=_status("SUCCEEDED"),
            kfp_run_id=kfp_run_id,
            tracking_config={"uri": tracking_server, "experiment": "unit-outcome"},
        )
        == "FINISHED"
    )
    client = MlflowClient(tracking_uri=tracking_server)
    experiment = client.get_experiment_by_name("unit-outcome")
    (found,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`puzzle.kfp_run_id` = '{kfp_run_id}'"
    )
    assert found.info.status == "FINISHED" and found.data.tags["puzzle.outcome"] == "SUCCEEDED"


def test_without_tracking_the_outcome_is_only_logged(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        record_outcome.python_func(status=_status("CANCELLED"), kfp_run_id="k", tracking_config={"uri": None})
        == "KILLED"
    )
