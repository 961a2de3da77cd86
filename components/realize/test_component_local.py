"""The realize component, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_realize_builds_the_best_solution(local_pipeline_run) -> None:
    from puzzle.child.realize import pick_solution
    from puzzle.modeling import BlockConfig

    run = local_pipeline_run
    _, best = pick_solution(str(run.artifact("search", "solutions")), 0)
    config = json.loads((run.artifact("realize", "child") / "config.json").read_text())
    names = [
        BlockConfig.from_json(
            b, hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"]
        ).name
        for b in config["block_configs"]
    ]
    assert names == [b.name for b in best]
