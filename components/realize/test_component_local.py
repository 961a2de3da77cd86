"""The realize component, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_realize_builds_the_candidate_it_chose(local_pipeline_run) -> None:
    from puzzle.child.realize import pick_solution
    from puzzle.modeling import BlockConfig

    run = local_pipeline_run
    info = json.loads((run.artifact("realize", "child") / "parent.json").read_text())
    ranking = info["realized_from"].get("candidates")
    # Several candidates: the one of lowest held-out KL is chosen (and says so); one: that one.
    chosen = next(c["rank"] for c in ranking if c["chosen"]) if ranking else 1
    if ranking:
        realized = [c for c in ranking if c["kl_div"] is not None]
        assert min(realized, key=lambda c: c["kl_div"])["rank"] == chosen
    _, best = pick_solution(str(run.artifact("search", "solutions")), chosen - 1)
    config = json.loads((run.artifact("realize", "child") / "config.json").read_text())
    names = [
        BlockConfig.from_json(
            b, hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"]
        ).name
        for b in config["block_configs"]
    ]
    assert names == [b.name for b in best]
