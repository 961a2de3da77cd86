"""KFP component: the shard indices a fan-out step iterates over (``dsl.ParallelFor`` items)."""

from kfp import dsl

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def shard_plan(shards: int) -> list[int]:
    """``[0, 1, ..., shards - 1]``; a run-time parameter cannot be looped over directly.

    Args:
        shards: how many shards the work is split into (>= 1).

    Returns:
        The shard indices.
    """
    count = int(shards)
    if count < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return list(range(count))
