"""KFP component: export the child as a servable Hugging Face checkpoint, published to S3."""

from kfp import dsl
from kfp.dsl import Input, Markdown, Model, Output

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def export(
    child: Input[Model],
    serving_uri: str,
    checkpoint: Output[Model],
    report: Output[Markdown],
    dtype: str = "auto",
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
) -> str:
    """Write the Nemotron-NAS checkpoint and copy it to the serving prefix.

    Args:
        child: the child artifact to export.
        serving_uri: where serving engines read the checkpoint (s3://bucket/prefix); empty: only the
            pipeline artifact.
        checkpoint: the exported checkpoint (safetensors, tokenizer, config.json with block_configs,
            modeling code via auto_map, EXPORT_REPORT.md).
        report: the export report (layers and which serving engines can load the child).
        dtype: cast weights to float32, bfloat16 or float16; auto keeps the child's dtype.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).

    Returns:
        The URI of the checkpoint to serve (the serving prefix, or the artifact's URI).
    """
    import shutil
    from pathlib import Path

    from components import _runtime
    from puzzle.child.export import REPORT_MD
    from puzzle.child.export import export as export_child
    from puzzle.io import storage

    _runtime.setup_logging()
    if serving_uri:
        storage.check_access(serving_uri, write=True)  # fail before the export, not after
    manifest = export_child(
        child.path, _runtime.out_path(checkpoint), dtype=None if dtype in ("", "auto") else dtype
    )
    shutil.copyfile(Path(checkpoint.path) / REPORT_MD, _runtime.out_path(report))
    served = checkpoint.uri
    if serving_uri:
        _runtime.copy_artifact(checkpoint.path, serving_uri)
        served = serving_uri
    _runtime.describe(checkpoint, manifest, serving_uri=served)
    _runtime.track(
        checkpoint,
        manifest,
        phase="export",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
    return served
