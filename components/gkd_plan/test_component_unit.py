"""The GKD plan gives the GKD pod its GPUs, or none when a multi-node TrainJob trains."""

import pytest

from components.gkd_plan.component import gkd_plan


def test_one_node_trains_in_the_pod_and_more_nodes_on_a_trainjob_whose_pods_hold_the_gpus() -> None:
    assert gkd_plan.python_func(gkd_config={"nodes": 1}, gpus=8) == 8
    assert gkd_plan.python_func(gkd_config={}, gpus=1.0) == 1  # pipeline numbers may be floats
    assert gkd_plan.python_func(gkd_config={"nodes": 2}, gpus=8) == 0


def test_a_bad_gkd_section_fails_the_plan() -> None:
    from puzzle.config import ConfigError

    with pytest.raises(ConfigError, match=r"gkd\.nodes must be > 0"):
        gkd_plan.python_func(gkd_config={"nodes": 0}, gpus=1)
