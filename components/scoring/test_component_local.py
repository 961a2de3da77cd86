"""The scoring component, run by KFP's local runner on each of the pipeline's 2 shards."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_each_scoring_shard_scores_its_rows(local_pipeline_run) -> None:
    shards = local_pipeline_run.task_dirs("scoring")
    assert len(shards) == local_pipeline_run.arguments["scoring"]["shards"] == 2
    rows = [json.loads((s / "scores" / "scores.json").read_text())["rows"] for s in shards]
    assert all(rows) and not {(r["layer"], r["block"]) for r in rows[0]} & {
        (r["layer"], r["block"]) for r in rows[1]
    }
    assert all(r["kl_div"] >= 0 and r["lm_loss"] > 0 for shard in rows for r in shard)
