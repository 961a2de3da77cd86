"""KFP component ``realize``: the chosen child assembled from the library."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def realize(
    library: Input[Model],
    solutions: Input[Artifact],
    parent: Input[Model],
    child: Output[Model],
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Assemble the best solution's child: its blocks from the library, embeddings and head from the parent.

    Args:
        library: the trained library.
        solutions: the search's solutions.
        parent: the parent artifact.
        child: the realized child artifact.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime

    inputs = {"library": library, "solutions": solutions, "parent": parent}
    _runtime.phase("realize", inputs, child, {}, tracked=(tracking_config, kfp_run_id))
