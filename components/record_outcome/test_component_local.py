"""The exit handler, run by KFP's local runner after the whole pipeline (real MLflow server)."""

import pytest

pytestmark = pytest.mark.integration


def test_record_outcome_closes_the_mlflow_run(local_pipeline_run) -> None:
    from mlflow import MlflowClient

    run = local_pipeline_run
    assert run.parameter("record-outcome", "Output") == "FINISHED"
    client = MlflowClient(tracking_uri=run.tracking_uri)
    experiment = client.get_experiment_by_name(run.arguments["tracking"]["experiment"])
    (top,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`puzzle.outcome` = 'SUCCEEDED'"
    )
    assert top.info.status == "FINISHED"
