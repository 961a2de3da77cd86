"""KFP component ``export``: the child as a servable Hugging Face checkpoint (Nemotron-NAS layout)."""

from kfp import dsl
from kfp.dsl import Input, Markdown, Model, Output

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def export(
    child: Input[Model],
    export: Output[Model],
    report: Output[Markdown],
    export_config: dict,
    serving_uri: str = "",
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
) -> str:
    """Export the child (safetensors, tokenizer, config.json with block_configs, modeling code via
    auto_map) and publish it where serving engines read it.

    Args:
        child: the child artifact to export.
        export: the exported checkpoint (with EXPORT_REPORT.md).
        report: the export report (layers and which serving engines can load the child).
        export_config: the export section (dtype, shard size).
        serving_uri: where serving engines read the checkpoint (s3://bucket/prefix); empty: only the
            pipeline artifact.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).

    Returns:
        The URI of the checkpoint to serve (the serving prefix, or the artifact's URI).
    """
    import shutil
    from pathlib import Path

    from components import _runtime
    from puzzle.child.export import REPORT_MD
    from puzzle.io import storage

    _runtime.setup_logging()
    if serving_uri:
        storage.check_access(serving_uri, write=True)  # fail before the export, not after
    manifest = _runtime.run_stage("export", {"child": child}, export, {"export": export_config})
    shutil.copyfile(Path(export.path) / REPORT_MD, _runtime.out_path(report))
    served = export.uri
    if serving_uri:
        _runtime.copy_artifact(export.path, serving_uri)
        served = serving_uri
    _runtime.describe(export, manifest, serving_uri=served)
    _runtime.track(export, manifest, phase="export", tracking_config=tracking_config, kfp_run_id=kfp_run_id)
    return served
