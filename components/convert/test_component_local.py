"""The convert component, run by KFP's local runner as the first step of the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_convert_reads_the_parent_from_s3(local_pipeline_run) -> None:
    run = local_pipeline_run
    parent = run.artifact("convert", "parent")
    # A failed local task can be reported as a success: look at the artifact itself.
    assert json.loads((parent / "manifest.json").read_text())["kind"] == "parent"
    assert json.loads((parent / "parent.json").read_text())["reference"] == run.parent_uri
    assert (parent / "model.safetensors").is_file()
    assert run.metadata("convert", "parent")["parent"] == run.parent_uri
