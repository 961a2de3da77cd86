"""The realize component, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_realize_builds_the_best_solution(local_pipeline_run) -> None:
    from puzzle.modeling import BlockConfig

    run = local_pipeline_run
    data = json.loads((run.artifact("search", "solutions") / "solutions.json").read_text())
    best = (data["solutions"] if isinstance(data, dict) else data)[0]
    config = json.loads((run.artifact("realize", "child") / "config.json").read_text())
    names = [
        BlockConfig.from_json(b, hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"]).name
        for b in config["block_configs"]
    ]
    assert names == best["blocks"]
