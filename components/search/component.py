"""KFP component ``search``: the candidates, exact pair scores, coupled BLD, speed met when measured."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def search(
    scores: Input[Artifact],
    costs: Input[Artifact],
    library: Input[Model],
    parent: Input[Model],
    tokens: Input[Dataset],
    solutions: Output[Artifact],
    search_config: dict,
    scoring_config: dict,
    bld_config: dict,
    device: str = "auto",
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Solve the grouped knapsack exactly (python-mip) for the top diverse candidates; score their
    (attention, FFN) pairs exactly (scoring.mode hybrid) and re-solve, train the chosen pairs jointly
    (bld.coupled chosen) and re-score, then measure every candidate whole and tighten a missed speed
    limit. The pipeline pins this step to the target GPU product: the measurements are only valid there.

    Args:
        scores: the scores table (decoupled rows).
        costs: the cost table of the target GPU.
        library: the trained library.
        parent: the parent artifact.
        tokens: tokens artifact with the scoring and BLD splits.
        solutions: the solutions artifact (solutions.json: candidates with predicted and measured
            figures; rounds.json; pairs.csv; coupled/ with coupled BLD).
        search_config: the search section (objective, constraints, candidates, corrections).
        scoring_config: the scoring section (mode, metrics, split).
        bld_config: the bld section (coupled, budget of the coupled pairs).
        device: auto, cpu, cuda, cuda:N.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime

    inputs = {"scores": scores, "costs": costs, "library": library, "parent": parent, "tokens": tokens}
    configs = {"search": search_config, "scoring": scoring_config, "bld": bld_config}
    tracked = (tracking_config, kfp_run_id)
    _runtime.phase("search", inputs, solutions, configs, tracked=tracked, device=device)
