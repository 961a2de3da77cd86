"""KFP component ``scoring``: replace-1-block scores of one shard of the library's rows."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def scoring(
    library: Input[Model],
    parent: Input[Model],
    tokens: Input[Dataset],
    scores: Output[Artifact],
    scoring_config: dict,
    shard_index: int,
    device: str = "auto",
):
    """Score shard ``shard_index`` (of ``scoring_config.shards``): the parent with one block swapped,
    against the parent.

    Args:
        library: the trained library.
        parent: the parent artifact.
        tokens: tokens artifact with the held-out split.
        scores: this shard's rows of the scores table.
        scoring_config: the scoring section (metrics, split, batch size, dtype).
        shard_index: which shard (0-based).
        device: auto, cpu, cuda, cuda:N.
    """
    from components import _runtime

    inputs = {"library": library, "parent": parent, "tokens": tokens}
    shard = _runtime.shard_of("scoring", scoring_config, shard_index)
    _runtime.phase("scoring", inputs, scores, {"scoring": scoring_config}, device=device, shard=shard)
