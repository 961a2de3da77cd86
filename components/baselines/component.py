"""KFP component: the simpler ways to shrink the parent, evaluated beside the Puzzle child."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from pipelines.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def compare_baselines(
    child: Input[Model],
    parent: Input[Model],
    library: Input[Model],
    scores: Input[Artifact],
    costs: Input[Artifact],
    tokens: Input[Dataset],
    methods: list,
    constraints: list,
    comparison: Output[Artifact],
    report: Output[HTML],
    gkd: bool = True,
    objective: str = "kl_div",
    gkd_settings: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    evaluate_settings: dict = {},  # noqa: B006
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
):
    """Each baseline at the same constraints and GKD budget, evaluated with the Puzzle child in one report.

    For every method (uniform_width, layer_dropping, greedy, noop_only): its solution from the same
    scores and costs, the child realized from the library, the same GKD (when ``gkd``), then one
    evaluation of the Puzzle child and every baseline against the parent (report and Pareto plot).
    Baselines run one after another in this pod: they are a comparison, not the product.

    Args:
        child: the distilled Puzzle child.
        parent: the parent as an all-parent child artifact.
        library: the trained library.
        scores: the score table.
        costs: the cost table.
        tokens: the tokens artifact.
        methods: baseline methods; empty writes an evaluation of the Puzzle child alone.
        constraints: the search constraints the baselines must meet too.
        comparison: the evaluation artifact of the child and every baseline.
        report: its HTML report.
        gkd: give each baseline the Puzzle child's GKD budget.
        objective: the score column the baselines optimise.
        gkd_settings: keyword arguments of puzzle.distill.distill (token_budget, batch_size, lr, ...).
        evaluate_settings: keyword arguments of puzzle.evaluate.evaluate (split, batch_size, workload, ...).
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    import shutil
    from pathlib import Path

    from components import _runtime
    from puzzle.baselines import baseline
    from puzzle.distill import distill
    from puzzle.evaluate import evaluate
    from puzzle.realize import realize

    _runtime.setup_logging()
    work = Path(comparison.path).parent / "baselines-work"
    children = {"puzzle": child.path}
    details = {"puzzle": {"role": "child", "method": "puzzle"}}
    for method in [str(m) for m in methods]:
        solutions = str(work / method / "solutions")
        baseline(method, scores.path, costs.path, solutions, library=library.path, objective=objective,
                 constraints=[str(c) for c in constraints])
        final = str(work / method / "realized")
        realize(library.path, solutions, final, solution_index=0, parent_child=parent.path)
        if gkd:
            distilled = str(work / method / "distilled")
            # Pipeline dicts travel as JSON structs, whose numbers are floats.
            counts = ("token_budget", "batch_size", "checkpoint_every", "seed")
            distill(final, parent.path, tokens.path, distilled,
                    **{k: int(v) if k in counts else v for k, v in gkd_settings.items()})
            final = distilled
        children[method] = final
        details[method] = {"role": "baseline", "method": method}
    settings = dict(evaluate_settings)
    if "workload" in settings:
        settings["workload"] = {k: int(v) for k, v in settings["workload"].items()}
    for key in ("batch_size", "repeats"):
        if key in settings:
            settings[key] = int(settings[key])
    manifest = evaluate(children, parent.path, tokens.path, _runtime.out_path(comparison), details=details,
                        primary="puzzle", **settings)
    shutil.copyfile(Path(comparison.path) / "report.html", _runtime.out_path(report))
    shutil.rmtree(work, ignore_errors=True)
    _runtime.describe(comparison, manifest, methods=",".join(str(m) for m in methods))
    _runtime.track(comparison, manifest, phase="baselines", tracking_uri=tracking_uri, experiment=experiment,
                   kfp_run_id=kfp_run_id)
