"""The search component, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_search_returns_a_solution_per_request(local_pipeline_run) -> None:
    run = local_pipeline_run
    data = json.loads((run.artifact("search", "solutions") / "solutions.json").read_text())
    solutions = data["solutions"] if isinstance(data, dict) else data
    assert len(solutions) == run.arguments["search_num_solutions"]
    assert len(solutions[0]["blocks"]) == 3
