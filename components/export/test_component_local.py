"""The export component runs under KFP's local runner and publishes to a real S3 server."""

from pathlib import Path

import pytest
from kfp import dsl

from components.export.component import export


@pytest.mark.integration
def test_export_runs_locally_and_publishes_to_s3(kfp_local: Path, tiny_child: Path, s3_bucket: str) -> None:
    from puzzle import artifacts

    serving = f"s3://{s3_bucket}/serving/tiny"

    @dsl.pipeline
    def export_only(child_uri: str, serving_uri: str) -> str:
        child = dsl.importer(artifact_uri=child_uri, artifact_class=dsl.Model, reimport=False)
        return export(child=child.output, serving_uri=serving_uri).outputs["Output"]

    run = export_only(child_uri=str(tiny_child), serving_uri=serving)

    assert run.output == serving
    manifest = artifacts.require_manifest(serving, "export")
    assert "config.json" in manifest.files and "EXPORT_REPORT.md" in manifest.files
