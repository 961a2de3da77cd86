"""KFP component: merge the BLD shards into one trained library (the fan-in of the BLD fan-out)."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def merge_library(
    base: Input[Model],
    shards: Input[list[Model]],
    library: Output[Model],
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
):
    """Merge every shard's trained variants into the base library.

    Args:
        base: the untrained library the shards were trained from.
        shards: every BLD shard's output (``dsl.Collected``).
        library: the complete, trained library.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime
    from puzzle.library.bld import merge

    _runtime.setup_logging()
    # The base is passed explicitly: the URI recorded in a shard is a path inside its own pod.
    manifest = merge([s.path for s in shards], _runtime.out_path(library), base=base.path)
    _runtime.describe(library, manifest)
    _runtime.track(
        library,
        manifest,
        phase="bld",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
