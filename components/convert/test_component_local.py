"""The convert component, run by KFP's local runner as the first step of the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_convert_reads_the_parent_from_s3(local_pipeline_run) -> None:
    run = local_pipeline_run
    child = run.artifact("convert", "child")
    # A failed local task can be reported as a success: look at the artifact itself.
    assert json.loads((child / "manifest.json").read_text())["kind"] == "child"
    assert json.loads((child / "parent.json").read_text())["reference"] == run.parent_uri
    assert (child / "model.safetensors").is_file()
    assert run.metadata("convert", "child")["parent"] == run.parent_uri
