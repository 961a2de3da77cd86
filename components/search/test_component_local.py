"""The search component, run by KFP's local runner inside the whole pipeline."""

import pytest

pytestmark = pytest.mark.integration


def test_search_returns_a_solution_per_request(local_pipeline_run) -> None:
    from puzzle.child.realize import pick_solution, read_solutions

    run = local_pipeline_run
    solutions = str(run.artifact("search", "solutions"))
    assert len(read_solutions(solutions)) == run.arguments["search"]["num_solutions"]
    assert len(pick_solution(solutions, 0)[1]) == 3
