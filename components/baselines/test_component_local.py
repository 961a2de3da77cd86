"""The baseline comparison, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_compare_baselines_evaluates_child_and_baselines_together(local_pipeline_run) -> None:
    run = local_pipeline_run
    metrics = json.loads((run.artifact("compare-baselines", "comparison") / "metrics.json").read_text())
    assert set(metrics["models"]) == {"parent", "puzzle", *run.arguments["baselines_methods"]}
    assert metrics["models"]["uniform_width"]["role"] == "baseline"
