"""KFP component ``baselines``: the simpler compressions at the same constraints and GKD budget."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def baselines(
    library: Input[Model],
    scores: Input[Artifact],
    costs: Input[Artifact],
    parent: Input[Model],
    tokens: Input[Dataset],
    children: Output[Model],
    search_config: dict,
    gkd_config: dict,
    baselines_config: dict,
    device: str = "auto",
    tracking_config: dict = {},  # noqa: B006 - KFP reads defaults from the signature
    kfp_run_id: str = "",
):
    """Every method of ``baselines_config.methods``, one after another in this pod: its solution at the
    search's constraints, its child realized from the library and (with ``baselines_config.gkd``) given
    the Puzzle child's GKD. Baselines are a comparison, not the product, so they share one GPU.

    Args:
        library: the trained library.
        scores: the scores table.
        costs: the cost table.
        parent: the parent artifact.
        tokens: the tokens artifact.
        children: one child artifact per method, in ``<method>/`` (empty when there are none).
        search_config: the search section (objective and constraints the baselines must meet).
        gkd_config: the gkd section (the Puzzle child's GKD).
        baselines_config: the baselines section (methods, whether they get GKD).
        device: auto, cpu, cuda, cuda:N.
        tracking_config: the tracking section (MLflow URI and experiment).
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    import shutil
    import tempfile
    from pathlib import Path

    from components import _runtime
    from puzzle.search.baselines import baseline_child

    _runtime.setup_logging()
    configs = {"search": search_config, "gkd": gkd_config, "baselines": baselines_config}
    sections = _runtime.sections("baselines", configs)
    root = Path(_runtime.out_path(children))
    root.mkdir(parents=True, exist_ok=True)
    inputs = (library.path, scores.path, costs.path, parent.path, tokens.path)
    for method in sections["baselines"].methods:
        work = tempfile.mkdtemp(prefix=f"baseline-{method}-")
        try:
            manifest = baseline_child(
                method, *inputs, str(root / method), **sections, work=work, device=device
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        children.metadata[method] = manifest.content_hash
        _runtime.track(
            children,
            manifest,
            phase=f"baselines-{method}",
            tracking_config=tracking_config,
            kfp_run_id=kfp_run_id,
            subfolder=method,
        )
