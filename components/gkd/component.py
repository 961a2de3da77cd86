"""KFP component ``gkd``: global knowledge distillation of the realized child against the parent."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def gkd(
    child: Input[Model],
    parent: Input[Model],
    tokens: Input[Dataset],
    distilled: Output[Model],
    gkd_config: dict,
    device: str = "auto",
    gpus: int = 1,
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Train the whole child against the parent: sum of per-layer (1 - cos) + KL(parent || child).

    With ``gpus`` > 1 the step runs ``torchrun --nproc-per-node gpus puzzle gkd ...`` inside its pod
    (data-parallel; ``gkd_config.batch_size`` is the global batch).

    Args:
        child: the realized child.
        parent: the parent artifact.
        tokens: tokens artifact with a "gkd" split.
        distilled: the distilled child artifact.
        gkd_config: the gkd section (budget, batch, learning rate, loss weights, checkpoints).
        device: auto, cpu, cuda, cuda:N.
        gpus: GPUs of this pod to train on (torchrun when > 1).
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    import subprocess
    import tempfile
    from pathlib import Path

    import yaml

    from components import _runtime
    from puzzle.io import artifacts

    _runtime.setup_logging()
    inputs = {"child": child, "parent": parent, "tokens": tokens}
    if int(gpus) > 1:
        _runtime.sections("gkd", {"gkd": gkd_config})  # a bad field fails here, before torchrun starts
        out = _runtime.out_path(distilled)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "gkd.yaml"
            config.write_text(yaml.safe_dump({"gkd": dict(gkd_config)}))
            command = [
                "torchrun",
                "--standalone",
                f"--nproc-per-node={int(gpus)}",
                "--no-python",
                "puzzle",
                "gkd",
            ]
            command += [
                child.path,
                parent.path,
                tokens.path,
                "--out",
                out,
                "--config",
                str(config),
                "--device",
                device,
            ]
            subprocess.run(command, check=True)
        manifest = artifacts.require_manifest(out, "child")
    else:
        manifest = _runtime.run_stage("gkd", inputs, distilled, {"gkd": gkd_config}, device=device)
    _runtime.describe(distilled, manifest)
    _runtime.track(distilled, manifest, phase="gkd", tracking_config=tracking_config, kfp_run_id=kfp_run_id)
