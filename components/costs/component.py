"""KFP component ``costs``: measured per-block costs on the target GPU."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def costs(
    library: Input[Model],
    parent: Input[Model],
    costs: Output[Artifact],
    costs_config: dict,
    device: str = "auto",
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Measure prefill/decode latency and memory of every sub-block of the library on this node's GPU.

    The pipeline pins this step to the target GPU product: a cost table is valid only on the
    hardware it was measured on, and the search refuses tables from other hardware.

    Args:
        library: the library (its variant names; weights are not read).
        parent: the parent artifact (shapes and the parent's blocks).
        costs: the cost table (costs.json with the hardware identity, costs.csv).
        costs_config: the costs section (serving workload, dtype, repeats).
        device: auto, cpu, cuda, cuda:N.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime

    inputs, tracked = {"library": library, "parent": parent}, (tracking_config, kfp_run_id)
    _runtime.phase("costs", inputs, costs, {"costs": costs_config}, device=device, tracked=tracked)
