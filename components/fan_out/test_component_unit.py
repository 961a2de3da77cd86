"""The fan-out plan lists every shard index once, or the items of a list field."""

import pytest

from components.fan_out.component import fan_out


def test_fan_out_lists_every_shard_index() -> None:
    assert fan_out.python_func(config={"shards": 3}, section="bld", field="shards") == [0, 1, 2]
    # pipeline numbers may arrive as floats
    assert fan_out.python_func(config={"shards": 1.0}, section="scoring", field="shards") == [0]


def test_fan_out_lists_the_items_of_a_list_field() -> None:
    config = {"methods": ["uniform_width", "greedy"]}
    assert fan_out.python_func(config=config, section="baselines", field="methods") == [
        "uniform_width",
        "greedy",
    ]
    assert fan_out.python_func(config={"methods": []}, section="baselines", field="methods") == []


def test_fan_out_rejects_zero_shards() -> None:
    from puzzle.config import ConfigError

    with pytest.raises(ConfigError, match=r"bld\.shards must be > 0"):
        fan_out.python_func(config={"shards": 0}, section="bld", field="shards")
