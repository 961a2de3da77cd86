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
    gkd_token_budget: int = 16384,
    gkd_batch_size: int = 8,
    gkd_lr: float = 1e-4,
    gkd_warmup_fraction: float = 0.05,
    gkd_weight_cosine: float = 1.0,
    gkd_weight_kl: float = 1.0,
    gkd_weight_lm: float = 0.0,
    gkd_checkpoint_every: int = 50,
    gkd_grad_checkpointing: bool = False,
    gkd_seed: int = 0,
    gkd_device: str = "auto",
    evaluate_split: str = "eval",
    evaluate_batch_size: int = 8,
    workload_batch_size: int = 1,
    workload_prompt_len: int = 64,
    workload_gen_len: int = 64,
    evaluate_repeats: int = 3,
    evaluate_device: str = "auto",
    lm_eval_tasks: list = [],  # noqa: B006 - KFP reads defaults from the signature
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
        gkd_token_budget: GKD training tokens per baseline (the Puzzle child's budget).
        gkd_batch_size: GKD batch in sequences.
        gkd_lr: GKD peak learning rate.
        gkd_warmup_fraction: share of GKD steps for the warm-up.
        gkd_weight_cosine: weight of the per-layer cosine loss.
        gkd_weight_kl: weight of KL(parent || child).
        gkd_weight_lm: weight of the LM loss.
        gkd_checkpoint_every: steps between GKD checkpoints.
        gkd_grad_checkpointing: recompute activations to save memory.
        gkd_seed: GKD data order seed.
        gkd_device: auto, cpu, cuda, cuda:N.
        evaluate_split: the held-out split.
        evaluate_batch_size: sequences per forward pass.
        workload_batch_size: batch of the speed measurement.
        workload_prompt_len: prompt tokens of the speed measurement.
        workload_gen_len: generated tokens of the speed measurement.
        evaluate_repeats: speed measurement repeats (median).
        evaluate_device: auto, cpu, cuda, cuda:N.
        lm_eval_tasks: lm-evaluation-harness tasks.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    import shutil
    from pathlib import Path

    from components import _runtime
    from puzzle.child.evaluate import evaluate
    from puzzle.child.gkd import distill
    from puzzle.child.realize import realize
    from puzzle.search.baselines import baseline

    _runtime.setup_logging()
    work = Path(comparison.path).parent / "baselines-work"
    children = {"puzzle": child.path}
    details = {"puzzle": {"role": "child", "method": "puzzle"}}
    for method in [str(m) for m in methods]:
        solutions = str(work / method / "solutions")
        # The parent and tokens are passed explicitly: the paths recorded in the scores are another pod's.
        baseline(
            method,
            scores.path,
            costs.path,
            solutions,
            library=library.path,
            objective=objective,
            constraints=[str(c) for c in constraints],
            child=parent.path,
            tokens=tokens.path,
        )
        final = str(work / method / "realized")
        realize(library.path, solutions, final, solution_index=0, parent_child=parent.path)
        if gkd:
            distilled = str(work / method / "distilled")
            distill(
                final,
                parent.path,
                tokens.path,
                distilled,
                token_budget=int(gkd_token_budget),
                batch_size=int(gkd_batch_size),
                lr=float(gkd_lr),
                warmup_fraction=float(gkd_warmup_fraction),
                weight_cosine=float(gkd_weight_cosine),
                weight_kl=float(gkd_weight_kl),
                weight_lm=float(gkd_weight_lm),
                checkpoint_every=int(gkd_checkpoint_every),
                grad_checkpointing=bool(gkd_grad_checkpointing),
                seed=int(gkd_seed),
                device=gkd_device,
            )
            final = distilled
        children[method] = final
        details[method] = {"role": "baseline", "method": method}
    workload = {
        "batch_size": int(workload_batch_size),
        "prompt_len": int(workload_prompt_len),
        "gen_len": int(workload_gen_len),
    }
    manifest = evaluate(
        children,
        parent.path,
        tokens.path,
        _runtime.out_path(comparison),
        split=evaluate_split,
        batch_size=int(evaluate_batch_size),
        workload=workload,
        device=evaluate_device,
        repeats=int(evaluate_repeats),
        lm_eval_tasks=[str(t) for t in lm_eval_tasks],
        details=details,
        primary="puzzle",
    )
    shutil.copyfile(Path(comparison.path) / "report.html", _runtime.out_path(report))
    shutil.rmtree(work, ignore_errors=True)
    _runtime.describe(comparison, manifest, methods=",".join(str(m) for m in methods))
    _runtime.track(
        comparison,
        manifest,
        phase="baselines",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
