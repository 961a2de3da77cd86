"""KFP component ``register``: the exported child in the MLflow Model Registry, and the gate's verdict."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def register(
    parent_uri: str,
    export: Input[Model],
    evaluation: Input[Artifact],
    registry_config: dict,
    search_config: dict,
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    profile: str = "",
    kfp_run_id: str = "",
) -> bool:
    """Register the export as a version of ``registry_config.model_name`` (alias ``candidate``) with its
    lineage (parent, constraints, accuracy kept, measured speedup, KFP run, profile) and say whether it
    meets the gates; the pipeline promotes it (the promote component) only then. Without a model name
    nothing is registered and the gate does not pass.

    Args:
        parent_uri: where the parent came from (s3://..., models:/NAME/VERSION).
        export: the exported checkpoint.
        evaluation: the evaluation artifact (accuracy kept and speedup become version tags).
        registry_config: the registry section (model name, gates).
        search_config: the search section (its constraints are recorded).
        tracking_config: the tracking section (MLflow URI and experiment).
        profile: the request profile that started the run, if any.
        kfp_run_id: the KFP run id.

    Returns:
        Whether the child is registered and its evaluation meets the gates (the pipeline's gate
        condition: one output, so that every KFP backend resolves it).
    """
    import logging

    from components import _runtime
    from puzzle.mlflow import registry, tracking

    _runtime.setup_logging()
    configs = {"registry": registry_config, "search": search_config, "tracking": tracking_config}
    settings = _runtime.sections("register", configs)
    if settings["registry"].model_name is None:
        logging.getLogger(__name__).info("registry.model_name is not set: nothing registered")
        return False
    settings["tracking"] = _runtime.tracking_settings(tracking_config)
    with tracking.pipeline_run(
        name=f"puzzle-{kfp_run_id}" if kfp_run_id else "puzzle",
        tracking_uri=settings["tracking"].uri,
        experiment=settings["tracking"].experiment,
        kfp_run_id=kfp_run_id or None,
    ):
        registration = registry.register_child(
            export.path,
            settings["registry"].model_name,
            registry.lineage(
                parent_uri, evaluation.path, settings["search"], kfp_run_id=kfp_run_id, profile=profile
            ),
            tracking_uri=settings["tracking"].uri,
            experiment=settings["tracking"].experiment,
        )
    gates = settings["registry"].gates
    figures = registry.figures_from_evaluation(evaluation.path)
    reasons = registry.gate_reasons(figures, gates.min_accuracy_kept, gates.min_speedup)
    logging.getLogger(__name__).info(
        "registered %s; gate %s",
        registration.uri,
        "passed" if not reasons else "failed: " + "; ".join(reasons),
    )
    return not reasons
