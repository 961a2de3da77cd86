"""KFP exit handler: record how the pipeline run ended in its MLflow run, and close that run."""

from kfp import dsl
from kfp.dsl import PipelineTaskFinalStatus

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def record_outcome(
    status: PipelineTaskFinalStatus,
    kfp_run_id: str,
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
) -> str:
    """Tag the MLflow run of this KFP run with the outcome and end it (FINISHED, FAILED or KILLED).

    Runs whatever happened to the other steps (``dsl.ExitHandler``). Without a tracking URI it
    only logs the outcome.

    Args:
        status: the final status of the steps inside the exit handler (filled in by KFP).
        kfp_run_id: the KFP run id.
        tracking_config: the tracking section (MLflow URI and experiment).

    Returns:
        The MLflow status the run was ended with.
    """
    import logging

    from components import _runtime
    from puzzle.mlflow import tracking

    _runtime.setup_logging()
    settings = _runtime.tracking_settings(tracking_config)
    state = str(status.state).upper()
    mlflow_status = {"SUCCEEDED": "FINISHED", "CANCELED": "KILLED", "CANCELLED": "KILLED"}.get(
        state, "FAILED"
    )
    logging.getLogger(__name__).info(
        "pipeline run %s ended %s (%s)%s",
        kfp_run_id,
        state,
        mlflow_status,
        f": {status.error_message}" if status.error_message else "",
    )
    with tracking.pipeline_run(
        name=f"puzzle-{kfp_run_id}",
        tracking_uri=settings.uri,
        experiment=settings.experiment,
        kfp_run_id=kfp_run_id,
        close=False,
    ) as run:
        if run is not None:
            run.set_tags(
                {
                    "puzzle.outcome": state,
                    "puzzle.kfp_job": status.pipeline_job_resource_name,
                    "puzzle.error": (status.error_message or "")[:5000] or None,
                }
            )
    tracking.finish_pipeline_run(
        kfp_run_id, mlflow_status, tracking_uri=settings.uri, experiment=settings.experiment
    )
    return mlflow_status
