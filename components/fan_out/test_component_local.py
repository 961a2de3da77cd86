"""The fan-out plan runs under KFP's local runner and returns a list a ParallelFor can iterate."""

from pathlib import Path

from components.fan_out.component import fan_out


def test_fan_out_runs_locally(kfp_local: Path) -> None:
    assert fan_out(config={"shards": 4}, section="bld", field="shards").output == [0, 1, 2, 3]
