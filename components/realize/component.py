"""KFP component: assemble the child of one search solution from the library's weights."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def realize(
    library: Input[Model],
    solutions: Input[Artifact],
    parent: Input[Model],
    child: Output[Model],
    solution_index: int = 0,
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
):
    """Build the child of solution ``solution_index``.

    Args:
        library: the (BLD-trained) block library.
        solutions: the search's solutions.json artifact.
        parent: the all-parent child the library was built from (embeddings, LM head, tokenizer).
        child: the realized child artifact.
        solution_index: which solution (0 = the best).
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime
    from puzzle.child.realize import realize as realize_child

    _runtime.setup_logging()
    manifest = realize_child(
        library.path,
        solutions.path,
        _runtime.out_path(child),
        solution_index=int(solution_index),
        parent_child=parent.path,
    )
    _runtime.describe(child, manifest, solution_index=int(solution_index))
    _runtime.track(
        child,
        manifest,
        phase="realize",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
