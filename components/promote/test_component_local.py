"""The promote component, run by KFP's local runner behind the pipeline's gate (real MLflow server)."""

import pytest

pytestmark = pytest.mark.integration


def test_promote_moves_champion_when_the_gate_passes(local_pipeline_run) -> None:
    from mlflow import MlflowClient

    run = local_pipeline_run
    assert run.parameter("register", "Output") is True
    assert run.parameter("promote", "Output") is True
    client = MlflowClient(tracking_uri=run.tracking_uri, registry_uri=run.tracking_uri)
    champion = client.get_model_version_by_alias(run.arguments["registry"]["model_name"], "champion")
    assert champion.version == run.registered_version()
    assert champion.tags["puzzle.gate"] == "passed"
