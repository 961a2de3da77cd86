"""The distill component runs under KFP's local runner."""

import json
from pathlib import Path

from kfp import dsl

from components.distill.component import distill


def test_distill_runs_locally(kfp_local: Path, tiny_realized: Path, tiny_child: Path, tiny_tokens: Path) -> None:
    @dsl.pipeline
    def distill_only(child_uri: str, parent_uri: str, tokens_uri: str) -> dsl.Model:
        child = dsl.importer(artifact_uri=child_uri, artifact_class=dsl.Model)
        parent = dsl.importer(artifact_uri=parent_uri, artifact_class=dsl.Model)
        tokens = dsl.importer(artifact_uri=tokens_uri, artifact_class=dsl.Dataset)
        task = distill(
            child=child.output, parent=parent.output, tokens=tokens.output, token_budget=128, batch_size=4, device="cpu"
        )
        return task.outputs["distilled"]

    run = distill_only(child_uri=str(tiny_realized), parent_uri=str(tiny_child), tokens_uri=str(tiny_tokens))

    manifest = json.loads((Path(run.output.path) / "manifest.json").read_text())
    assert manifest["kind"] == "child" and manifest["summary"]["steps"] == 1
