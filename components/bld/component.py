"""KFP component: blockwise local distillation (BLD) of one shard of the library's variants."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from pipelines.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def train_blocks(
    library: Input[Model],
    child: Input[Model],
    tokens: Input[Dataset],
    shard_index: int,
    num_shards: int,
    token_budget: int,
    trained: Output[Model],
    batch_size: int = 8,
    lr: float = 1e-3,
    warmup_fraction: float = 0.05,
    seed: int = 0,
    device: str = "auto",
    checkpoint_every: int = 50,
):
    """Train shard ``shard_index`` of ``num_shards`` of the library's trainable variants.

    Each variant learns to reproduce the parent's block on the parent's activations (normalised
    MSE); the shard's output holds only its trained variants (merge them with the bld_merge
    component).

    Args:
        library: the untrained library.
        child: the parent as an all-parent child artifact.
        tokens: tokens artifact with a "bld" split.
        shard_index: which shard (0-based).
        num_shards: how many shards the variants are split into.
        token_budget: training tokens per variant.
        trained: this shard's trained variants (a partial library).
        batch_size: sequences per step.
        lr: peak AdamW learning rate (warm-up then cosine).
        warmup_fraction: share of steps for the linear warm-up.
        seed: orders the training sequences.
        device: auto, cpu, cuda, cuda:N.
        checkpoint_every: steps between checkpoints (a retried pod resumes).
    """
    from components import _runtime
    from puzzle.library.bld import train

    _runtime.setup_logging()
    # Loop items and numbers from Collected/JSON may arrive as floats.
    shard = f"{int(shard_index)}/{int(num_shards)}"
    manifest = train(
        library.path,
        child.path,
        tokens.path,
        _runtime.out_path(trained),
        token_budget=int(token_budget),
        batch_size=int(batch_size),
        lr=float(lr),
        warmup_fraction=float(warmup_fraction),
        seed=int(seed),
        shard=shard,
        checkpoint_every=int(checkpoint_every),
        device=None if device == "auto" else device,
    )
    _runtime.describe(trained, manifest, shard=shard)
