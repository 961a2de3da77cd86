"""KFP component: move the ``champion`` alias to a registered child that met the gate."""

from kfp import dsl

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def promote(
    model_name: str,
    version: str,
    min_accuracy_kept: float,
    min_speedup: float,
    tracking_uri: str = "",
) -> bool:
    """Promote a version to ``champion`` when its accuracy-kept and speedup tags meet the targets.

    The pipeline only runs this step inside its gate (``dsl.If``); the registry checks the
    version's own tags again, so a version never becomes champion on stale figures.

    Args:
        model_name: the registered model's name.
        version: the version to promote.
        min_accuracy_kept: target share of the parent's next-token accuracy.
        min_speedup: target measured throughput over the parent's.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI).

    Returns:
        Whether the version is now the champion.
    """
    from components import _runtime
    from puzzle.mlflow import registry

    _runtime.setup_logging()
    result = registry.promote(
        model_name,
        version,
        min_accuracy_kept=float(min_accuracy_kept),
        min_speedup=float(min_speedup),
        tracking_uri=tracking_uri or None,
    )
    return result.passed
