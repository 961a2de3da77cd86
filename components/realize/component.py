"""KFP component ``realize``: the candidates assembled from the library, the best by measured quality."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def realize(
    library: Input[Model],
    solutions: Input[Artifact],
    parent: Input[Model],
    tokens: Input[Dataset],
    child: Output[Model],
    scoring_config: dict,
    search_config: dict,
    gkd_config: dict,
    device: str = "auto",
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Assemble every candidate that meets its targets when measured (blocks from the library, with the
    coupled overlay; embeddings and head from the parent), optionally give each a short GKD, and keep the
    one closest to the parent (KL on the scoring split); its parent.json ranks them all.

    Args:
        library: the trained library.
        solutions: the search's candidates.
        parent: the parent artifact.
        tokens: tokens artifact with the scoring (and GKD) splits.
        child: the chosen child artifact.
        scoring_config: the scoring section (split and batch size the candidates are compared on).
        search_config: the search section (candidate_gkd_tokens).
        gkd_config: the gkd section (settings of the candidates' short GKD).
        device: auto, cpu, cuda, cuda:N.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime

    inputs = {"library": library, "solutions": solutions, "parent": parent, "tokens": tokens}
    configs = {"scoring": scoring_config, "search": search_config, "gkd": gkd_config}
    _runtime.phase("realize", inputs, child, configs, tracked=(tracking_config, kfp_run_id), device=device)
