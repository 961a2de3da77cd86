"""BLD fanned out over shards with dsl.ParallelFor and merged with dsl.Collected, under KFP's local runner."""

import json
from pathlib import Path

from kfp import dsl

from components.bld.component import train_blocks
from components.bld_merge.component import merge_library
from components.conftest import TINY_BLD
from components.shard_plan.component import shard_plan


def test_bld_fan_out_and_merge_run_locally(kfp_local: Path, tiny_library: Path, tiny_child: Path, tiny_tokens: Path) -> None:
    @dsl.pipeline
    def sharded_bld(library_uri: str, child_uri: str, tokens_uri: str, shards: int) -> dsl.Model:
        library = dsl.importer(artifact_uri=library_uri, artifact_class=dsl.Model)
        child = dsl.importer(artifact_uri=child_uri, artifact_class=dsl.Model)
        tokens = dsl.importer(artifact_uri=tokens_uri, artifact_class=dsl.Dataset)
        plan = shard_plan(shards=shards)
        with dsl.ParallelFor(plan.output, parallelism=2) as index:
            shard = train_blocks(
                library=library.output, child=child.output, tokens=tokens.output, shard_index=index,
                num_shards=shards, device="cpu", **TINY_BLD,
            )
        return merge_library(base=library.output, shards=dsl.Collected(shard.outputs["trained"])).outputs["library"]

    run = sharded_bld(library_uri=str(tiny_library), child_uri=str(tiny_child), tokens_uri=str(tiny_tokens), shards=2)

    meta = json.loads((Path(run.output.path) / "library.json").read_text())
    trained = sorted(
        (layer, name) for layer, e in meta["layers"].items() for name, info in e["variants"].items() if info.get("trained")
    )
    assert trained == sorted((str(layer), name) for layer in range(3) for name in ("attn_kv1", "attn_linear"))
