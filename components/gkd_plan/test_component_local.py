"""The GKD plan runs under KFP's local runner and returns the GPUs of the GKD pod."""

from pathlib import Path

from components.gkd_plan.component import gkd_plan


def test_gkd_plan_runs_locally(kfp_local: Path) -> None:
    assert gkd_plan(gkd_config={"nodes": 2}, gpus=4).output == 0
