"""KFP component: build the block library (every variant of every layer, initialised from the parent)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from pipelines.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def build_library(
    child: Input[Model],
    tokens: Input[Dataset],
    kv_heads: list,
    attention_linear: bool,
    attention_noop: bool,
    ffn_fractions: list,
    ffn_linear: bool,
    ffn_noop: bool,
    library: Output[Model],
    batch_size: int = 8,
    seed: int = 0,
    device: str = "auto",
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
):
    """Initialise every sub-block variant from the parent on the calibration split.

    Args:
        child: the parent as an all-parent child artifact.
        tokens: tokens artifact with a "calibration" split.
        kv_heads: KV-head counts of the GQA variants; [] means every divisor of the parent's.
        attention_linear: include linear attention (W_O.W_V).
        attention_noop: include no-op attention.
        ffn_fractions: FFN widths as fractions of the parent's.
        ffn_linear: include the linear (least-squares) FFN.
        ffn_noop: include no-op FFN.
        library: the library artifact (library.json + weights per layer).
        batch_size: calibration sequences per forward pass.
        seed: seeds random initialisations (the random-channel baseline).
        device: auto, cpu, cuda, cuda:N.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime
    from puzzle.library.variants import SearchSpace
    from puzzle.library.variants import build_library as build

    _runtime.setup_logging()
    space = SearchSpace(
        attention_kv_heads=tuple(int(n) for n in kv_heads) or None,
        attention_linear=attention_linear,
        attention_noop=attention_noop,
        ffn_fractions=tuple(float(f) for f in ffn_fractions),
        ffn_linear=ffn_linear,
        ffn_noop=ffn_noop,
    )
    manifest = build(
        child.path,
        tokens.path,
        _runtime.out_path(library),
        space=space,
        batch_size=int(batch_size),
        seed=int(seed),
        device=None if device == "auto" else device,
    )
    _runtime.describe(library, manifest)
    _runtime.track(
        library,
        manifest,
        phase="library",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
