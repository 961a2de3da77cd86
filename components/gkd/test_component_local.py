"""The gkd component, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_gkd_trains_the_realized_child(local_pipeline_run) -> None:
    run = local_pipeline_run
    manifest = json.loads((run.artifact("gkd", "distilled") / "manifest.json").read_text())
    assert manifest["kind"] == "child"
    # gkd.token_budget 64 at batch 2 x seq_len 32 = 1 step
    assert manifest["summary"]["steps"] == 1
    assert run.metadata("gkd", "distilled")["mlflow_run_id"]
