"""KFP component ``gkd_plan``: how many GPUs the GKD step's own pod gets."""

from kfp import dsl

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def gkd_plan(gkd_config: dict, gpus: int) -> int:
    """``gpus`` when GKD trains in the step's own pod (``gkd_config.nodes`` is 1), ``0`` when the step
    runs it as a Kubeflow Trainer TrainJob (``nodes`` > 1), whose pods get the GPUs, node by node.
    (A field inside a section parameter cannot be a resource request directly.)

    Args:
        gkd_config: the gkd section, validated here.
        gpus: the pipeline's gkd_gpus (GPUs of the pod, or of each TrainJob node).

    Returns:
        The GPUs to request for the GKD step's pod.
    """
    from puzzle.config import parse_section

    return int(gpus) if parse_section("gkd", gkd_config).nodes <= 1 else 0
