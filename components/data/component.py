"""KFP component ``data``: text -> token splits, tokenized with the parent's tokenizer."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def data(parent: Input[Model], tokens: Output[Dataset], data_config: dict):
    """Tokenize the configured text source into disjoint splits of fixed-length sequences.

    Args:
        parent: the parent artifact (its tokenizer is used).
        tokens: the tokens artifact (one safetensors file per split, splits.json).
        data_config: the data section (source, seq_len, splits, seed).
    """
    from components import _runtime

    _runtime.setup_logging()
    settings = _runtime.sections("data", {"data": data_config})["data"]
    manifest = _runtime.run_stage("data", {"parent": parent}, tokens, {"data": data_config})
    sequences = {f"sequences_{name}": count for name, count in settings.splits.items()}
    _runtime.describe(tokens, manifest, source=settings.source, **sequences)
