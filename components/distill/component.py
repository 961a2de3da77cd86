"""KFP component: global knowledge distillation (GKD) of the realized child against the parent."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from pipelines.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def distill(
    child: Input[Model],
    parent: Input[Model],
    tokens: Input[Dataset],
    distilled: Output[Model],
    token_budget: int,
    batch_size: int = 8,
    lr: float = 1e-4,
    warmup_fraction: float = 0.05,
    weight_cosine: float = 1.0,
    weight_kl: float = 1.0,
    weight_lm: float = 0.0,
    checkpoint_every: int = 50,
    grad_checkpointing: bool = False,
    seed: int = 0,
    device: str = "auto",
    gpus: int = 1,
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
):
    """Train the whole child against the parent: sum of per-layer (1 - cos) + KL(parent || child).

    With ``gpus`` > 1 the step runs ``torchrun --nproc-per-node gpus`` inside its pod
    (data-parallel; ``batch_size`` is the global batch).

    Args:
        child: the realized child.
        parent: the parent as an all-parent child artifact.
        tokens: tokens artifact with a "gkd" split.
        distilled: the distilled child artifact.
        token_budget: training tokens.
        batch_size: global batch in sequences.
        lr: peak learning rate (AdamW, warm-up then cosine).
        warmup_fraction: share of steps for the linear warm-up.
        weight_cosine: weight of the per-layer cosine loss.
        weight_kl: weight of KL(parent || child).
        weight_lm: weight of the LM loss (0 as in the paper).
        checkpoint_every: steps between checkpoints (a retried step resumes from the last one).
        grad_checkpointing: recompute activations to save memory.
        seed: data order seed.
        device: auto, cpu, cuda, cuda:N.
        gpus: GPUs of this pod to train on (torchrun when > 1).
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    import subprocess

    from components import _runtime
    from puzzle.child.gkd import distill as gkd
    from puzzle.io import artifacts

    _runtime.setup_logging()
    out = _runtime.out_path(distilled)
    settings = dict(
        token_budget=int(token_budget),
        batch_size=int(batch_size),
        lr=float(lr),
        warmup_fraction=float(warmup_fraction),
        weight_cosine=float(weight_cosine),
        weight_kl=float(weight_kl),
        weight_lm=float(weight_lm),
        checkpoint_every=int(checkpoint_every),
        seed=int(seed),
        grad_checkpointing=bool(grad_checkpointing),
    )
    if int(gpus) > 1:
        command = [
            "torchrun",
            "--standalone",
            f"--nproc-per-node={int(gpus)}",
            "--no-python",
            "puzzle",
            "distill",
            child.path,
            "--parent",
            parent.path,
            "--tokens",
            tokens.path,
            "--out",
            out,
            "--device",
            device,
        ]
        for key, value in settings.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                command += [flag] if value else []
            else:
                command += [flag, str(value)]
        subprocess.run(command, check=True)
        manifest = artifacts.require_manifest(out, "child")
    else:
        manifest = gkd(child.path, parent.path, tokens.path, out, device=device, **settings)
    _runtime.describe(distilled, manifest)
    _runtime.track(
        distilled,
        manifest,
        phase="distill",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
