"""KFP component ``promote``: alias ``champion`` for a registered child that passed the gate."""

from kfp import dsl
from kfp.dsl import Input, Model

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def promote(export: Input[Model], registry_config: dict, tracking_config: dict = {}) -> bool:  # noqa: B006
    """Move alias ``champion`` to ``version`` when its own tags (accuracy kept, measured speedup) meet
    the gates.

    The pipeline runs this step only inside its gate (``dsl.If``); the registry checks the
    version's tags again, so a version never becomes champion on stale figures.

    Args:
        export: the exported checkpoint (its registered version is found by content hash).
        registry_config: the registry section (model name, gates).
        tracking_config: the tracking section (MLflow URI).

    Returns:
        Whether the version is now the champion.
    """
    from components import _runtime
    from puzzle.mlflow import registry

    _runtime.setup_logging()
    settings = _runtime.sections("register", {"registry": registry_config})["registry"]
    tracking_uri = _runtime.tracking_settings(tracking_config).uri
    version = registry.registered_version(export.path, settings.model_name, tracking_uri=tracking_uri)
    result = registry.promote(
        settings.model_name,
        version,
        min_accuracy_kept=settings.gates.min_accuracy_kept,
        min_speedup=settings.gates.min_speedup,
        tracking_uri=tracking_uri,
    )
    return result.passed
