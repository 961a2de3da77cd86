"""KFP component ``search``: the MIP, one block per layer under the constraints."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def search(
    scores: Input[Artifact],
    costs: Input[Artifact],
    solutions: Output[Artifact],
    search_config: dict,
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Solve the grouped knapsack exactly (python-mip): best summed score under the constraints.

    Args:
        scores: the scores table.
        costs: the cost table of the target GPU.
        solutions: the solutions artifact (solutions.json: blocks per layer, objective, predicted costs).
        search_config: the search section (objective, constraints, diverse solutions, time limits).
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime

    inputs, tracked = {"scores": scores, "costs": costs}, (tracking_config, kfp_run_id)
    _runtime.phase("search", inputs, solutions, {"search": search_config}, tracked=tracked)
