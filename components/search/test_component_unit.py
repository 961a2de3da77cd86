"""The search component returns the best architecture that meets the constraints."""

from __future__ import annotations

from pathlib import Path

import pytest
from kfp import dsl

from components.search.component import search


def _run(
    scores: Path,
    costs: Path,
    out: Path,
    constraints: list[str],
    *,
    library: Path,
    parent: Path,
    tokens: Path,
    bld: dict | None = None,
    **settings,
) -> dsl.Artifact:
    solutions = dsl.Artifact(name="solutions", uri=str(out), metadata={})
    search.python_func(
        scores=dsl.Artifact(name="scores", uri=str(scores), metadata={}),
        costs=dsl.Artifact(name="costs", uri=str(costs), metadata={}),
        library=dsl.Model(name="library", uri=str(library), metadata={}),
        parent=dsl.Model(name="parent", uri=str(parent), metadata={}),
        tokens=dsl.Dataset(name="tokens", uri=str(tokens), metadata={}),
        solutions=solutions,
        search_config={"constraints": constraints, **settings},
        scoring_config={"metrics": ["kl_div", "lm_loss"], "batch_size": 4},
        bld_config=bld or {"coupled": "none"},
        device="cpu",
    )
    return solutions


def test_search_meets_a_parameter_budget_with_every_pair_scored_exactly(
    tiny_scores: Path,
    tiny_costs: Path,
    tiny_parent: Path,
    tiny_trained_library: Path,
    tiny_tokens: Path,
    tmp_path: Path,
) -> None:
    from puzzle.child.realize import read_solutions, solution_blocks
    from puzzle.modeling.checkpoints import load_model

    solutions = _run(
        tiny_scores,
        tiny_costs,
        tmp_path / "solutions",
        ["parameters<=0.8x"],
        library=tiny_trained_library,
        parent=tiny_parent,
        tokens=tiny_tokens,
        num_solutions=2,
        alpha=0.5,
    )

    found = read_solutions(str(tmp_path / "solutions"))
    assert 1 <= len(found) <= 2
    parent_blocks = [b.name for b in load_model(tiny_parent).config.blocks]
    for solution in found:
        assert [b.name for b in solution_blocks(solution, "solution")] != parent_blocks
        assert solution["exact_pairs"] and solution["meets_targets"]
    assert solutions.metadata["kind"] == "solutions"
    assert (tmp_path / "solutions" / "pairs.csv").is_file() and (
        tmp_path / "solutions" / "rounds.json"
    ).is_file()


def test_search_refuses_an_impossible_constraint(
    tiny_scores: Path,
    tiny_costs: Path,
    tiny_parent: Path,
    tiny_trained_library: Path,
    tiny_tokens: Path,
    tmp_path: Path,
) -> None:
    from puzzle.errors import PuzzleError

    with pytest.raises(PuzzleError, match="parameters"):
        _run(
            tiny_scores,
            tiny_costs,
            tmp_path / "solutions",
            ["parameters<=0.0001x"],
            library=tiny_trained_library,
            parent=tiny_parent,
            tokens=tiny_tokens,
        )
    assert not (tmp_path / "solutions").exists()
