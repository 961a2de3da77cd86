"""The export component, run by KFP's local runner inside the whole pipeline, publishing to S3."""

import pytest

pytestmark = pytest.mark.integration


def test_export_publishes_to_the_serving_prefix(local_pipeline_run) -> None:
    from puzzle.io import artifacts

    run = local_pipeline_run
    served = artifacts.require_manifest(run.serving_uri, "export")
    local = artifacts.require_manifest(str(run.artifact("export", "export")), "export")
    assert served.content_hash == local.content_hash
    assert run.parameter("export", "Output") == run.serving_uri
    assert "parameters" in run.artifact("export", "report").read_text()
