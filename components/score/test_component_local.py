"""The scoring component runs one shard under KFP's local runner."""

import json
from pathlib import Path

from kfp import dsl

from components.conftest import TINY_METRICS
from components.score.component import score_blocks


def test_score_blocks_runs_locally(kfp_local: Path, tiny_trained_library: Path, tiny_child: Path, tiny_tokens: Path) -> None:
    @dsl.pipeline
    def one_shard(library_uri: str, child_uri: str, tokens_uri: str) -> dsl.Artifact:
        library = dsl.importer(artifact_uri=library_uri, artifact_class=dsl.Model)
        child = dsl.importer(artifact_uri=child_uri, artifact_class=dsl.Model)
        tokens = dsl.importer(artifact_uri=tokens_uri, artifact_class=dsl.Dataset)
        task = score_blocks(
            library=library.output, child=child.output, tokens=tokens.output, shard_index=2, num_shards=3,
            metrics=TINY_METRICS, batch_size=4, device="cpu",
        )
        return task.outputs["scores"]

    run = one_shard(library_uri=str(tiny_trained_library), child_uri=str(tiny_child), tokens_uri=str(tiny_tokens))

    rows = json.loads((Path(run.output.path) / "scores.json").read_text())["rows"]
    assert {r["layer"] for r in rows} == {2} and len(rows) == 5
