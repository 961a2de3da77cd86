"""KFP component ``evaluate``: the Puzzle child and the baselines against the parent, measured."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def evaluate(
    child: Input[Model],
    baselines: Input[Model],
    parent: Input[Model],
    tokens: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    evaluate_config: dict,
    costs_config: dict,
    search_config: dict,
    device: str = "auto",
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
) -> NamedTuple("Outputs", accuracy_kept=float, speedup=float):
    """Quality on held-out in-domain and out-of-domain tokens at the serving context (KL, perplexity,
    accuracy kept with 95 % intervals, agreement) and measured speed at every searched workload of the
    child and every baseline against the parent, in one report; the child's constraints are checked on
    what was measured (the step fails, after writing the report, when one is missed). The pipeline pins
    this step to the target GPU product: the speedup is only valid there.

    Args:
        child: the distilled Puzzle child.
        baselines: the baselines' children, one folder per method (a method that cannot reach the
            target holds its solutions, saying why).
        parent: the parent artifact.
        tokens: tokens artifact with the held-out split.
        evaluation: the evaluation artifact (metrics.json, report.md, report.html, plots).
        metrics: the Puzzle child's key figures as KFP metrics.
        report: the HTML report.
        evaluate_config: the evaluate section (splits, sequence length, batch sizes, repeats, bootstrap).
        costs_config: the costs section (the searched workloads).
        search_config: the search section (the constraints checked on the measured figures).
        device: auto, cpu, cuda, cuda:N.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).

    Returns:
        accuracy_kept: the child's next-token accuracy over the parent's (0.0 when the parent predicts
            no token right and the ratio is undefined, so that the gate fails closed).
        speedup: the child's measured throughput over the parent's.
    """
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from components import _runtime
    from puzzle.child.evaluate import PUZZLE, read_metrics

    _runtime.setup_logging()
    folders = sorted(p for p in Path(baselines.path).iterdir() if (p / "manifest.json").is_file())
    by_method = {p.name: str(p) for p in folders}
    inputs = {"child": child, "baselines": by_method, "parent": parent, "tokens": tokens}
    configs = {"evaluate": evaluate_config, "costs": costs_config, "search": search_config}
    manifest = _runtime.run_stage("evaluate", inputs, evaluation, configs, device=device)
    figures = read_metrics(evaluation.path)["models"][PUZZLE]
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
        evaluation, manifest, phase="evaluate", tracking_config=tracking_config, kfp_run_id=kfp_run_id
    )
    outputs = namedtuple("Outputs", ["accuracy_kept", "speedup"])
    return outputs(float(figures.get("accuracy_kept") or 0.0), float(figures.get("speedup") or 0.0))
