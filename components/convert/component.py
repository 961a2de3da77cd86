"""KFP component: load the parent and convert it into an all-parent-blocks child."""

from kfp import dsl
from kfp.dsl import Model, Output

from pipelines.images import CPU_IMAGE, image


@dsl.component(base_image=image(CPU_IMAGE), install_kfp_package=False)
def convert(parent: str, child: Output[Model], dtype: str = "float32"):
    """Convert a parent into a child whose every block is the parent's.

    Args:
        parent: s3:// prefix, models:/NAME/VERSION (MLflow registry), local path, GGUF file or hub id.
        child: the child artifact (Hugging Face layout with block_configs).
        dtype: float32, bfloat16 or float16.
    """
    from components import _runtime
    from puzzle.parent import convert as convert_parent

    _runtime.setup_logging()
    manifest = convert_parent(parent, _runtime.out_path(child), dtype=dtype)
    _runtime.describe(child, manifest, parent=parent)
