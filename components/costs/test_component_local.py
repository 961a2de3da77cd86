"""The costs component, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_costs_records_the_hardware(local_pipeline_run) -> None:
    run = local_pipeline_run
    costs = json.loads((run.artifact("costs", "costs") / "costs.json").read_text())
    assert costs  # the table of the CPU it ran on (the cluster pins this step to the target GPU)
    assert run.metadata("costs", "costs")["kind"] == "costs"
