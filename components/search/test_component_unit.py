"""The search component returns the best architecture that meets the constraints."""

from __future__ import annotations

from pathlib import Path

import pytest
from kfp import dsl

from components.search.component import search


def _run(scores: Path, costs: Path, out: Path, constraints: list[str], **settings) -> dsl.Artifact:
    solutions = dsl.Artifact(name="solutions", uri=str(out), metadata={})
    search.python_func(
        scores=dsl.Artifact(name="scores", uri=str(scores), metadata={}),
        costs=dsl.Artifact(name="costs", uri=str(costs), metadata={}),
        solutions=solutions,
        search_config={"constraints": constraints, **settings},
    )
    return solutions


def test_search_meets_a_parameter_budget(
    tiny_scores: Path, tiny_costs: Path, tiny_parent: Path, tmp_path: Path
) -> None:
    from puzzle.child.realize import read_solutions, solution_blocks
    from puzzle.modeling.checkpoints import load_model

    solutions = _run(
        tiny_scores, tiny_costs, tmp_path / "solutions", ["parameters<=0.8x"], num_solutions=2, alpha=0.5
    )

    found = read_solutions(str(tmp_path / "solutions"))
    assert 1 <= len(found) <= 2
    parent_blocks = [b.name for b in load_model(tiny_parent).config.blocks]
    for solution in found:
        assert [b.name for b in solution_blocks(solution, "solution")] != parent_blocks
    assert solutions.metadata["kind"] == "solutions"


def test_search_refuses_an_impossible_constraint(tiny_scores: Path, tiny_costs: Path, tmp_path: Path) -> None:
    from puzzle.errors import PuzzleError

    with pytest.raises(PuzzleError, match="parameters"):
        _run(tiny_scores, tiny_costs, tmp_path / "solutions", ["parameters<=0.0001x"])
