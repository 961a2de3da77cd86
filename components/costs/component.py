"""KFP component: measure every block variant's latency and memory on the target GPU."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from pipelines.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def measure_costs(
    library: Input[Model],
    child: Input[Model],
    batch_sizes: list,
    costs: Output[Artifact],
    prompt_len: int = 64,
    gen_len: int = 64,
    dtype: str = "auto",
    repeats: int = 3,
    device: str = "auto",
    tracking_uri: str = "",
    experiment: str = "",
    kfp_run_id: str = "",
):
    """Prefill and decode latency per block variant at each batch size, plus parameters and KV-cache memory.

    The table records the hardware it was measured on; the pipeline pins this step to the
    target GPU product with a node selector, because costs are only valid on that GPU.

    Args:
        library: the block library (each distinct variant shape is measured once).
        child: the parent as an all-parent child artifact (embeddings and LM head are measured too).
        batch_sizes: batch sizes of the serving workload.
        costs: the cost table (costs.json with the hardware identity).
        prompt_len: prompt tokens of the workload.
        gen_len: generated tokens of the workload.
        dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.
        repeats: measurement repeats (median).
        device: auto, cpu, cuda, cuda:N.
        tracking_uri: MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else no tracking).
        experiment: MLflow experiment.
        kfp_run_id: the KFP run id (the MLflow run is tagged with it).
    """
    from components import _runtime
    from puzzle.search.costs import measure

    _runtime.setup_logging()
    manifest = measure(
        library.path,
        child.path,
        _runtime.out_path(costs),
        batch_sizes=[int(b) for b in batch_sizes],
        prompt_len=int(prompt_len),
        gen_len=int(gen_len),
        device=None if device == "auto" else device,
        dtype=None if dtype == "auto" else dtype,
        repeats=int(repeats),
    )
    _runtime.describe(costs, manifest)
    _runtime.track(
        costs,
        manifest,
        phase="costs",
        tracking_uri=tracking_uri,
        experiment=experiment,
        kfp_run_id=kfp_run_id,
    )
