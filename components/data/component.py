"""KFP component: tokenize the text source into disjoint splits of fixed-length sequences."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def prepare_data(
    child: Input[Model],
    source: str,
    seq_len: int,
    splits: dict,
    tokens: Output[Dataset],
    seed: int = 0,
):
    """Pack the source, tokenized with the parent's tokenizer, into calibration/BLD/score/GKD/eval splits.

    Args:
        child: the converted parent (its tokenizer is used).
        source: "stdlib" (embedded corpus), an s3:// prefix of text/JSONL files, or hf:NAME[:CONFIG]:SPLIT.
        seq_len: tokens per sequence.
        splits: split name -> number of sequences, e.g. {"calibration": 16, "bld": 64, ...}.
        tokens: the tokens artifact (one safetensors file per split + splits.json).
        seed: shuffles documents and sequences.
    """
    from components import _runtime
    from puzzle.data import prepare

    _runtime.setup_logging()
    # A pipeline dict arrives as a JSON struct (numbers as floats) or, when it is built from run
    # parameters, with each value substituted as text ("8", "8.0").
    counts = {str(name): int(float(count)) for name, count in splits.items()}
    manifest = prepare(
        source, child.path, _runtime.out_path(tokens), seq_len=int(seq_len), splits=counts, seed=int(seed)
    )
    _runtime.describe(tokens, manifest, source=source, **{f"sequences_{k}": v for k, v in counts.items()})
