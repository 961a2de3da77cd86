"""The shard plan lists every shard index once."""

import pytest

from components.shard_plan.component import shard_plan


def test_shard_plan_lists_every_index() -> None:
    assert shard_plan.python_func(shards=3) == [0, 1, 2]
    assert shard_plan.python_func(shards=1.0) == [0]  # pipeline numbers may arrive as floats


def test_shard_plan_rejects_zero_shards() -> None:
    with pytest.raises(ValueError, match="shards must be >= 1"):
        shard_plan.python_func(shards=0)
