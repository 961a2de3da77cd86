"""The evaluate component, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_evaluate_outputs_the_gate_figures(local_pipeline_run) -> None:
    run = local_pipeline_run
    child = json.loads((run.artifact("evaluate", "evaluation") / "metrics.json").read_text())["models"][
        "puzzle"
    ]
    assert run.parameter("evaluate", "accuracy_kept") == pytest.approx(child["accuracy_kept"])
    assert run.parameter("evaluate", "speedup") == pytest.approx(child["speedup"])
    assert run.metadata("evaluate", "metrics")["kl_div"] == pytest.approx(child["kl_div"])
    assert "<html" in run.artifact("evaluate", "report").read_text().lower()
