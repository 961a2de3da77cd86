"""The data component runs under KFP's local runner."""

import json
from pathlib import Path

from kfp import dsl

from components.data.component import prepare_data


def test_prepare_data_runs_locally(kfp_local: Path, tiny_child: Path) -> None:
    @dsl.pipeline
    def data_only(child_uri: str) -> dsl.Dataset:
        child = dsl.importer(artifact_uri=child_uri, artifact_class=dsl.Model)
        return prepare_data(child=child.output, source="stdlib", seq_len=16, splits={"bld": 3, "eval": 2}).outputs[
            "tokens"
        ]

    run = data_only(child_uri=str(tiny_child))

    info = json.loads((Path(run.output.path) / "splits.json").read_text())
    assert {name: s["sequences"] for name, s in info["splits"].items()} == {"bld": 3, "eval": 2}
