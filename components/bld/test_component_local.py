"""The BLD component, run by KFP's local runner on each of the pipeline's 2 shards."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_each_bld_shard_trains_its_part(local_pipeline_run) -> None:
    shards = local_pipeline_run.task_dirs("train-blocks")
    assert len(shards) == local_pipeline_run.arguments["bld_shards"] == 2
    for index, shard in enumerate(shards):
        meta = json.loads((shard / "trained" / "library.json").read_text())
        assert meta["shard"] == f"{index}/2"
        losses = [v["bld"] for e in meta["layers"].values() for v in e["variants"].values()]
        assert losses and all(v["final_nmse"] < v["initial_nmse"] for v in losses)
