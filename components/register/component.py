"""KFP component: register the exported child in the MLflow Model Registry (alias ``candidate``)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def register(
    checkpoint: Input[Model],
    evaluation: Input[Artifact],
    model_name: str,
    parent_uri: str,
    constraints: list,
    profile: str = "",
    tracking_uri: str = "",
    experiment: str = "puzzle",
    kfp_run_id: str = "",
) -> NamedTuple("Outputs", model_uri=str, version=str):
    """Register the checkpoint as a new version (or find the same child already registered).

    Version tags carry the lineage: parent URI (and registered parent model/version for
    models:/ parents), constraints, accuracy kept, measured speedup, the KFP run.

    Args:
        checkpoint: the exported checkpoint.
        evaluation: the evaluation artifact (accuracy kept and speedup become version tags).
        model_name: the registered model's name.
        parent_uri: where the parent came from (s3://..., models:/NAME/VERSION).
        constraints: the search constraints, e.g. ["throughput>=1.5x"].
        profile: the request profile that started the run, if any.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI).
        experiment: MLflow experiment of the registration run.
        kfp_run_id: the KFP run id.

    Returns:
        model_uri: models:/NAME/VERSION.
        version: the registered version.
    """
    from collections import namedtuple

    from components import _runtime
    from puzzle.mlflow import registry, tracking

    _runtime.setup_logging()
    figures = registry.figures_from_evaluation(evaluation.path)
    lineage = registry.Lineage(
        parent_uri=parent_uri,
        constraints=[str(c) for c in constraints],
        accuracy_kept=figures.get("accuracy_kept"),
        speedup=figures.get("speedup"),
        kfp_run_id=kfp_run_id or None,
        profile=profile or None,
    )
    with tracking.pipeline_run(
        name=f"puzzle-{kfp_run_id}" if kfp_run_id else "puzzle",
        tracking_uri=tracking_uri or None,
        experiment=experiment or None,
        kfp_run_id=kfp_run_id or None,
    ):
        registration = registry.register_child(
            checkpoint.path,
            model_name,
            lineage,
            tracking_uri=tracking_uri or None,
            experiment=experiment or "puzzle",
        )
    checkpoint.metadata["registered_model"] = registration.uri
    outputs = namedtuple("Outputs", ["model_uri", "version"])
    return outputs(registration.uri, str(registration.version))
