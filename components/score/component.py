"""KFP component: replace-1-block scores of one shard of the library's blocks."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from pipelines.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def score_blocks(
    library: Input[Model],
    child: Input[Model],
    tokens: Input[Dataset],
    shard_index: int,
    num_shards: int,
    metrics: list,
    scores: Output[Artifact],
    split: str = "score",
    batch_size: int = 8,
    device: str = "auto",
):
    """Score shard ``shard_index`` of ``num_shards``: the parent with only one block swapped, against the parent.

    Args:
        library: the trained library.
        child: the parent as an all-parent child artifact.
        tokens: tokens artifact with the held-out scoring split.
        shard_index: which shard (0-based).
        num_shards: how many shards the rows are split into.
        metrics: kl_div, lm_loss, cosine, top1_agreement, top5_agreement.
        scores: this shard's rows (merge them with the score_merge component).
        split: the scoring split.
        batch_size: sequences per forward pass.
        device: auto, cpu, cuda, cuda:N.
    """
    from components import _runtime
    from puzzle.library.scoring import score

    _runtime.setup_logging()
    shard = f"{int(shard_index)}/{int(num_shards)}"
    manifest = score(
        library.path,
        child.path,
        tokens.path,
        _runtime.out_path(scores),
        split=split,
        metrics=[str(m) for m in metrics],
        shard=shard,
        batch_size=int(batch_size),
        device=None if device == "auto" else device,
    )
    _runtime.describe(scores, manifest, shard=shard)
