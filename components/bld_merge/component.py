"""KFP component ``bld_merge``: the BLD shards joined into one complete trained library."""

from typing import List  # noqa: UP035 - KFP reads typing.List in artifact annotations

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def bld_merge(
    library: Input[Model],
    shards: Input[List[Model]],  # noqa: UP006
    trained: Output[Model],
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Merge every BLD shard into the base library (each shard index exactly once).

    Args:
        library: the base (untrained) library the shards were trained from.
        shards: the bld component's outputs, one per shard.
        trained: the complete trained library.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime
    from puzzle.library.bld import merge

    _runtime.setup_logging()
    manifest = merge([s.path for s in shards], _runtime.out_path(trained), base=library.path)
    _runtime.describe(trained, manifest, shards=len(shards))
    _runtime.track(trained, manifest, phase="bld", tracking_config=tracking_config, kfp_run_id=kfp_run_id)
