"""KFP component: evaluate the child against the parent (quality on held-out tokens, measured speed)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from pipelines.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def evaluate(
    child: Input[Model],
    parent: Input[Model],
    tokens: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    split: str = "eval",
    batch_size: int = 8,
    workload_batch_size: int = 1,
    workload_prompt_len: int = 64,
    workload_gen_len: int = 64,
    repeats: int = 3,
    lm_eval_tasks: list = [],  # noqa: B006 - KFP reads defaults from the signature
    device: str = "auto",
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
) -> NamedTuple("Outputs", accuracy_kept=float, speedup=float):
    """KL, LM loss, next-token accuracy and top-k agreement against the parent; measured throughput.

    Args:
        child: the child to evaluate.
        parent: the parent as an all-parent child artifact.
        tokens: tokens artifact with the held-out split.
        evaluation: the evaluation artifact (metrics.json, report.md, report.html, plots).
        metrics: the child's key figures as KFP metrics.
        report: the HTML report.
        split: the held-out split.
        batch_size: sequences per forward pass.
        workload_batch_size: batch of the speed measurement.
        workload_prompt_len: prompt tokens of the speed measurement.
        workload_gen_len: generated tokens of the speed measurement.
        repeats: speed measurement repeats (median).
        lm_eval_tasks: lm-evaluation-harness tasks (run where lm_eval and the task data exist).
        device: auto, cpu, cuda, cuda:N.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).

    Returns:
        accuracy_kept: the child's next-token accuracy over the parent's (0.0 when the parent predicts
            no token right and the ratio is undefined, so that the gate fails closed).
        speedup: the child's measured throughput over the parent's.
    """
    import json
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from components import _runtime
    from puzzle.child.evaluate import METRICS_FILE
    from puzzle.child.evaluate import evaluate as evaluate_children

    _runtime.setup_logging()
    manifest = evaluate_children(
        {"puzzle": child.path},
        parent.path,
        tokens.path,
        _runtime.out_path(evaluation),
        split=split,
        batch_size=int(batch_size),
        workload={
            "batch_size": int(workload_batch_size),
            "prompt_len": int(workload_prompt_len),
            "gen_len": int(workload_gen_len),
        },
        device=device,
        repeats=int(repeats),
        lm_eval_tasks=[str(t) for t in lm_eval_tasks or []],
        details={"puzzle": {"role": "child", "method": "puzzle"}},
        primary="puzzle",
    )
    figures = json.loads((Path(evaluation.path) / METRICS_FILE).read_text())["models"]["puzzle"]
    for key in (
        "accuracy_kept",
        "speedup",
        "kl_div",
        "perplexity",
        "accuracy",
        "throughput",
        "parameters_kept",
    ):
        value = figures.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))
    shutil.copyfile(Path(evaluation.path) / "report.html", _runtime.out_path(report))
    _runtime.describe(evaluation, manifest)
    _runtime.track(
        evaluation,
        manifest,
        phase="evaluate",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
    outputs = namedtuple("Outputs", ["accuracy_kept", "speedup"])
    return outputs(float(figures.get("accuracy_kept") or 0.0), float(figures.get("speedup") or 0.0))
