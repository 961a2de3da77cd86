"""KFP component: join the scoring shards into one score table (the fan-in of the scoring fan-out)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Output

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def merge_scores(
    shards: Input[list[Artifact]],
    scores: Output[Artifact],
    heatmap: Output[HTML],
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
):
    """Join every shard's rows into scores.csv / scores.json / heatmap.png.

    Args:
        shards: every scoring shard's output (``dsl.Collected``).
        scores: the complete score table (one row per layer and block).
        heatmap: the heatmap (layers x blocks) as a page the KFP UI shows.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    import base64
    from pathlib import Path

    from components import _runtime
    from puzzle.library.scoring import merge

    _runtime.setup_logging()
    manifest = merge([s.path for s in shards], _runtime.out_path(scores))
    png = Path(scores.path) / "heatmap.png"
    image_tag = (
        f'<img alt="replace-1-block scores" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
        if png.exists()
        else "<p>no heatmap was written</p>"
    )
    Path(_runtime.out_path(heatmap)).write_text(
        f"<html><body><h1>Replace-1-block scores</h1>{image_tag}</body></html>\n"
    )
    _runtime.describe(scores, manifest)
    _runtime.track(
        scores,
        manifest,
        phase="scores",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
