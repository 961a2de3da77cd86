"""The shard plan runs under KFP's local runner and returns a list a ParallelFor can iterate."""

from pathlib import Path

from components.shard_plan.component import shard_plan


def test_shard_plan_runs_locally(kfp_local: Path) -> None:
    assert shard_plan(shards=4).output == [0, 1, 2, 3]
