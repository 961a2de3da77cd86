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
    trainer_runtime: str = "torch-distributed",
    s3_secret: str = "puzzle-s3",
    mlflow_secret: str = "puzzle-mlflow",
    env_config_map: str = "puzzle-env",
):
    """Train the whole child against the parent: sum of per-layer (1 - cos) + KL(parent || child).

    With ``gpus`` > 1 the step runs ``torchrun --nproc-per-node gpus puzzle gkd ...`` inside its pod
    (DDP or FSDP2, ``gkd_config.parallel``; ``gkd_config.batch_size`` is the global batch). With
    ``gkd_config.nodes`` > 1, in a cluster, it creates a Kubeflow Trainer TrainJob of ``nodes`` pods x
    ``gpus`` GPUs running the same command, follows it (status in the log and in MLflow), raises its
    failure reason, deletes it when done and re-attaches to it on a retry; outside a cluster
    (kfp.local) it trains in this pod as above.

    Args:
        child: the realized child.
        parent: the parent artifact.
        tokens: tokens artifact with a "gkd" split.
        distilled: the distilled child artifact.
        gkd_config: the gkd section (budget, batch, learning rate, loss weights, parallelism, nodes).
        device: auto, cpu, cuda, cuda:N.
        gpus: GPUs of this pod (of each TrainJob node when gkd_config.nodes > 1) to train on.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it; it names the TrainJob).
        trainer_runtime: the Kubeflow Trainer ClusterTrainingRuntime of a multi-node TrainJob.
        s3_secret: Secret with the S3 key pair, given to the TrainJob's pods.
        mlflow_secret: Secret with MLflow credentials, given to the TrainJob's pods.
        env_config_map: ConfigMap with the S3 endpoint and MLflow URI, given to the TrainJob's pods.
    """
    import logging
    import subprocess
    import tempfile
    from pathlib import Path

    import yaml

    from components import _runtime
    from components.gkd import trainjob
    from components.images import GPU_IMAGE, image
    from puzzle.io import artifacts

    _runtime.setup_logging()
    inputs = {"child": child, "parent": parent, "tokens": tokens}
    settings = _runtime.sections("gkd", {"gkd": gkd_config})["gkd"]  # a bad field fails here
    if settings.nodes > 1 and trainjob.in_cluster():
        manifest = trainjob.distill_on_trainjob(
            child=child.uri,
            parent=parent.uri,
            tokens=tokens.uri,
            out=distilled.uri,
            local_out=_runtime.out_path(distilled),
            gkd_config=dict(gkd_config),
            device=device,
            nodes=settings.nodes,
            gpus_per_node=int(gpus),
            image=image(GPU_IMAGE),
            runtime=trainer_runtime,
            s3_secret=s3_secret,
            mlflow_secret=mlflow_secret,
            env_config_map=env_config_map,
            kfp_run_id=kfp_run_id,
            tracking_config=tracking_config,
        )
    elif int(gpus) > 1 or settings.nodes > 1:
        if settings.nodes > 1:
            logging.getLogger(__name__).warning(
                "gkd.nodes=%d needs a cluster with Kubeflow Trainer; training here on %d process(es)",
                settings.nodes,
                int(gpus),
            )
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
