"""KFP component: the MIP search for the architectures that meet the constraints at the best score."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def search(
    scores: Input[Artifact],
    costs: Input[Artifact],
    constraints: list,
    solutions: Output[Artifact],
    objective: str = "kl_div",
    num_solutions: int = 1,
    alpha: float = 0.8,
    time_limit_s: float = 60.0,
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
):
    """One variant per layer, minimising the summed score under the constraints (python-mip, CBC).

    Args:
        scores: the replace-1-block score table.
        costs: the cost table of the target GPU.
        constraints: e.g. ["throughput>=1.5x", "memory<=20GiB"].
        solutions: solutions.json (choices per layer, objective, constraint totals, status, time).
        objective: the score column to optimise.
        num_solutions: diverse solutions to return.
        alpha: diversity: each next solution shares at most alpha x layers choices with earlier ones.
        time_limit_s: solver time limit per solution.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime
    from puzzle.search.mip import search as solve

    _runtime.setup_logging()
    manifest = solve(
        scores.path,
        costs.path,
        _runtime.out_path(solutions),
        objective=objective,
        constraints=[str(c) for c in constraints],
        num_solutions=int(num_solutions),
        diversity_alpha=float(alpha),
        time_limit=float(time_limit_s),
    )
    _runtime.describe(solutions, manifest)
    _runtime.track(
        solutions,
        manifest,
        phase="search",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
