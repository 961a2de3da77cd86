"""The baselines component, run by KFP's local runner inside the whole pipeline (one task, one child
per method); the evaluate component evaluates them with the Puzzle child."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_baselines_are_evaluated_together_with_the_child(local_pipeline_run) -> None:
    run = local_pipeline_run
    methods = run.arguments["baselines"]["methods"]
    folder = run.artifact("baselines", "children")
    assert sorted(p.name for p in folder.iterdir() if (p / "manifest.json").is_file()) == sorted(methods)
    metadata = run.metadata("baselines", "children")
    assert {key for key in metadata if "." not in key} == set(methods)  # each child's content hash
    assert all(metadata[f"{m}.mlflow_run_id"] for m in methods)  # each logged as its own phase run
    metrics = json.loads((run.artifact("evaluate", "evaluation") / "metrics.json").read_text())
    assert set(metrics["models"]) == {"parent", "puzzle", *methods}
    assert metrics["models"]["uniform_width"]["role"] == "baseline"
