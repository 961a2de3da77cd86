"""The convert component runs under KFP's local runner like a pipeline step."""

from __future__ import annotations

import json
from pathlib import Path

from components.convert.component import convert


def test_convert_runs_locally(kfp_local: Path, tiny_parent_factory) -> None:
    task = convert(parent=str(tiny_parent_factory("llama")), dtype="float32")

    child = task.outputs["child"]
    # A failed local task can be reported as a success: check the artifact itself.
    manifest = json.loads((Path(child.path) / "manifest.json").read_text())
    assert manifest["kind"] == "child"
    assert child.metadata["num_layers"] == 3
    assert (Path(child.path) / "model.safetensors").is_file()
