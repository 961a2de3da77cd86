"""KFP component ``bld``: blockwise local distillation of one shard of the library's variants."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import GPU_IMAGE, image


@dsl.component(base_image=image(GPU_IMAGE), install_kfp_package=False)
def bld(
    library: Input[Model],
    parent: Input[Model],
    tokens: Input[Dataset],
    trained: Output[Model],
    bld_config: dict,
    shard_index: int,
    device: str = "auto",
):
    """Train shard ``shard_index`` (of ``bld_config.shards``) of the library's trainable variants.

    Each variant learns to reproduce the parent's block on the parent's activations (normalised
    MSE); the shard's output holds only its trained variants (the bld_merge component joins them).

    Args:
        library: the untrained library.
        parent: the parent artifact.
        tokens: tokens artifact with a "bld" split.
        trained: this shard's trained variants (a partial library).
        bld_config: the bld section (budget, batch, learning rate, ...).
        shard_index: which shard (0-based).
        device: auto, cpu, cuda, cuda:N.
    """
    from components import _runtime

    inputs = {"library": library, "parent": parent, "tokens": tokens}
    shard = _runtime.shard_of("bld", bld_config, shard_index)
    _runtime.phase("bld", inputs, trained, {"bld": bld_config}, device=device, shard=shard)
