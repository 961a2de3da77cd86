"""The BLD component runs one shard under KFP's local runner."""

import json
from pathlib import Path

from kfp import dsl

from components.bld.component import train_blocks
from components.conftest import TINY_BLD


def test_train_blocks_runs_locally(kfp_local: Path, tiny_library: Path, tiny_child: Path, tiny_tokens: Path) -> None:
    @dsl.pipeline
    def one_shard(library_uri: str, child_uri: str, tokens_uri: str) -> dsl.Model:
        library = dsl.importer(artifact_uri=library_uri, artifact_class=dsl.Model)
        child = dsl.importer(artifact_uri=child_uri, artifact_class=dsl.Model)
        tokens = dsl.importer(artifact_uri=tokens_uri, artifact_class=dsl.Dataset)
        task = train_blocks(
            library=library.output, child=child.output, tokens=tokens.output, shard_index=0, num_shards=3,
            device="cpu", **TINY_BLD,
        )
        return task.outputs["trained"]

    run = one_shard(library_uri=str(tiny_library), child_uri=str(tiny_child), tokens_uri=str(tiny_tokens))

    meta = json.loads((Path(run.output.path) / "library.json").read_text())
    assert {layer: list(entry["variants"]) for layer, entry in meta["layers"].items()} == {
        "0": ["attn_kv1", "attn_linear"]
    }
