"""The register component, run by KFP's local runner inside the whole pipeline (real MLflow server)."""

import pytest

pytestmark = pytest.mark.integration


def test_register_creates_a_candidate_version(local_pipeline_run) -> None:
    from mlflow import MlflowClient

    run = local_pipeline_run
    name = run.arguments["registry"]["model_name"]
    version = run.registered_version()
    # The tiny run's gates are 0: the evaluation meets them.
    assert run.parameter("register", "Output") is True
    mv = MlflowClient(tracking_uri=run.tracking_uri, registry_uri=run.tracking_uri).get_model_version(
        name, version
    )
    assert "candidate" in mv.aliases and mv.tags["puzzle.kfp_run_id"]
