"""The scoring merge component, run by KFP's local runner on the collected shards of the pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_scoring_merge_writes_the_table_and_heatmap(local_pipeline_run) -> None:
    run = local_pipeline_run
    rows = json.loads((run.artifact("scoring-merge", "scores") / "scores.json").read_text())["rows"]
    assert {r["layer"] for r in rows} == {0, 1, 2}
    assert "data:image/png;base64," in run.artifact("scoring-merge", "heatmap").read_text()
