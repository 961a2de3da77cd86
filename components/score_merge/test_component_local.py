"""Scoring fanned out over shards with dsl.ParallelFor and joined with dsl.Collected, under KFP's local runner."""

import json
from pathlib import Path

from kfp import dsl

from components.conftest import TINY_METRICS
from components.score.component import score_blocks
from components.score_merge.component import merge_scores
from components.shard_plan.component import shard_plan


def test_scoring_fan_out_and_merge_run_locally(
    kfp_local: Path, tiny_trained_library: Path, tiny_child: Path, tiny_tokens: Path
) -> None:
    @dsl.pipeline
    def sharded_scoring(library_uri: str, child_uri: str, tokens_uri: str, shards: int) -> dsl.Artifact:
        library = dsl.importer(artifact_uri=library_uri, artifact_class=dsl.Model)
        child = dsl.importer(artifact_uri=child_uri, artifact_class=dsl.Model)
        tokens = dsl.importer(artifact_uri=tokens_uri, artifact_class=dsl.Dataset)
        plan = shard_plan(shards=shards)
        with dsl.ParallelFor(plan.output, parallelism=2) as index:
            shard = score_blocks(
                library=library.output, child=child.output, tokens=tokens.output, shard_index=index,
                num_shards=shards, metrics=TINY_METRICS, batch_size=4, device="cpu",
            )
        return merge_scores(shards=dsl.Collected(shard.outputs["scores"])).outputs["scores"]

    run = sharded_scoring(
        library_uri=str(tiny_trained_library), child_uri=str(tiny_child), tokens_uri=str(tiny_tokens), shards=2
    )

    rows = json.loads((Path(run.output.path) / "scores.json").read_text())["rows"]
    assert len({(r["layer"], r["block"]) for r in rows}) == 15
