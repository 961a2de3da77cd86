"""KFP component ``library``: every block variant of every layer, initialised from the parent."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def library(
    parent: Input[Model],
    tokens: Input[Dataset],
    library: Output[Model],
    library_config: dict,
    export_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    device: str = "auto",
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Build the block library: fewer-KV-head, linear and no-op attention; narrower, linear and no-op FFNs.

    Args:
        parent: the parent artifact.
        tokens: tokens artifact with a calibration split (channel contribution, least squares).
        library: the (untrained) library artifact.
        library_config: the library section (which variants, how they are initialised).
        export_config: the export section (its serve_with leaves out the variants a named engine
            cannot load; empty: every variant).
        device: auto, cpu, cuda, cuda:N.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime

    inputs, tracked = {"parent": parent, "tokens": tokens}, (tracking_config, kfp_run_id)
    configs = {"library": library_config, "export": export_config}
    _runtime.phase("library", inputs, library, configs, device=device, tracked=tracked)
