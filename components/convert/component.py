"""KFP component ``convert``: the parent in our layout (every block the parent's), checked."""

from kfp import dsl
from kfp.dsl import Model, Output

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def convert(parent_uri: str, parent: Output[Model], tracking_config: dict = {}, kfp_run_id: str = ""):  # noqa: B006
    """Load the parent and convert it into our heterogeneous layout; its logits are checked against
    the original's.

    Args:
        parent_uri: s3:// prefix, models:/NAME/VERSION (MLflow registry), GGUF file, hub id or smollm2.
        parent: the parent artifact (Hugging Face layout with block_configs).
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime

    _runtime.setup_logging()
    manifest = _runtime.run_stage("convert", {}, parent, {}, leading=(parent_uri,))
    _runtime.describe(parent, manifest, parent=parent_uri)
    _runtime.track(parent, manifest, phase="convert", tracking_config=tracking_config, kfp_run_id=kfp_run_id)
