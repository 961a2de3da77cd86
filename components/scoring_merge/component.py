"""KFP component ``scoring_merge``: the scoring shards joined into one scores table."""

from typing import List  # noqa: UP035 - KFP reads typing.List in artifact annotations

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Output

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def scoring_merge(
    shards: Input[List[Artifact]],  # noqa: UP006
    scores: Output[Artifact],
    heatmap: Output[HTML],
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Join the scoring shards (same library, parent, tokens and settings; every row once).

    Args:
        shards: the scoring component's outputs, one per shard.
        scores: the complete scores table (scores.csv, scores.json, heatmap).
        heatmap: the heatmap (layers x variants) as a page the KFP UI shows.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    import base64
    from pathlib import Path

    from components import _runtime
    from puzzle.library.scoring import HEATMAP, merge

    _runtime.setup_logging()
    manifest = merge([s.path for s in shards], _runtime.out_path(scores))
    png = Path(scores.path) / HEATMAP
    image_tag = "<p>no heatmap was written</p>"
    if png.exists():
        encoded = base64.b64encode(png.read_bytes()).decode()
        image_tag = f'<img alt="replace-1-block scores" src="data:image/png;base64,{encoded}">'
    Path(_runtime.out_path(heatmap)).write_text(
        f"<html><body><h1>Replace-1-block scores</h1>{image_tag}</body></html>\n"
    )
    _runtime.describe(scores, manifest, shards=len(shards))
    _runtime.track(scores, manifest, phase="scoring", tracking_config=tracking_config, kfp_run_id=kfp_run_id)
