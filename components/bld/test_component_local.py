"""The BLD component, run by KFP's local runner on each of the pipeline's 2 shards."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_each_bld_shard_trains_its_part(local_pipeline_run) -> None:
    shards = local_pipeline_run.task_dirs("bld")
    assert len(shards) == local_pipeline_run.arguments["bld"]["shards"] == 2
    for index, shard in enumerate(shards):
        meta = json.loads((shard / "trained" / "library.json").read_text())
        assert meta["shard"] == f"{index}/2"
        results = [v["bld"] for e in meta["layers"].values() for v in e["variants"].values()]
        # bld.token_budget 64 at batch 2 x seq_len 32 = 1 step per variant, measured before and after.
        assert results and all(
            r["steps"] == 1 and 0 < r["initial_nmse"] < 10 and 0 < r["final_nmse"] < 10 for r in results
        )
