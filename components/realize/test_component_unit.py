"""The realize component assembles the chosen solution's child from the library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.conftest import TINY_SOLUTION
from components.realize.component import realize


def _inputs(tiny_library: Path, solutions: Path, tiny_parent: Path, tokens: Path) -> dict:
    return {
        "library": dsl.Model(name="library", uri=str(tiny_library), metadata={}),
        "solutions": dsl.Artifact(name="solutions", uri=str(solutions), metadata={}),
        "parent": dsl.Model(name="parent", uri=str(tiny_parent), metadata={}),
        "tokens": dsl.Dataset(name="tokens", uri=str(tokens), metadata={}),
        "scoring_config": {"batch_size": 4},
        "search_config": {},
        "gkd_config": {},
        "device": "cpu",
    }


def test_realize_builds_the_solution(
    tiny_library: Path, tiny_solutions: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    from puzzle.modeling import BlockConfig

    child = dsl.Model(name="child", uri=str(tmp_path / "child"), metadata={})

    realize.python_func(child=child, **_inputs(tiny_library, tiny_solutions, tiny_parent, tiny_tokens))

    config = json.loads((tmp_path / "child" / "config.json").read_text())
    names = [
        BlockConfig.from_json(
            b, hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"]
        ).name
        for b in config["block_configs"]
    ]
    assert names == TINY_SOLUTION
    assert child.metadata["kind"] == "child"
    assert (
        child.metadata["num_parameters"]
        < json.loads((tiny_parent / "manifest.json").read_text())["summary"]["num_parameters"]
    )


def test_realize_rejects_missing_solution(
    tiny_library: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    """A search that found no candidate is refused."""
    from puzzle.errors import PuzzleError
    from puzzle.io import artifacts

    solutions = tmp_path / "solutions"

    def body(staging: Path, _inputs: dict[str, Path]) -> dict:
        (staging / "solutions.json").write_text(json.dumps({"solutions": []}))
        return {"solutions": 0}

    artifacts.run_phase("solutions", str(solutions), {}, {"hand_written": True}, body)
    child = dsl.Model(name="child", uri=str(tmp_path / "child"), metadata={})
    with pytest.raises(PuzzleError, match="holds no solution"):
        realize.python_func(child=child, **_inputs(tiny_library, solutions, tiny_parent, tiny_tokens))
    assert not (tmp_path / "child").exists()
