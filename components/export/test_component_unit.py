"""The export component writes the checkpoint, its report and a copy at the serving prefix."""

from __future__ import annotations

import json
from pathlib import Path

from kfp import dsl

from components.export.component import export as export_component


def _outputs(tmp_path: Path) -> tuple[dsl.Model, dsl.Markdown]:
    return (
        dsl.Model(name="export", uri=str(tmp_path / "export"), metadata={}),
        dsl.Markdown(name="report", uri=str(tmp_path / "report"), metadata={}),
    )


def test_export_publishes_checkpoint_to_serving_prefix(tiny_parent: Path, tmp_path: Path) -> None:
    export, report = _outputs(tmp_path)
    child = dsl.Model(name="child", uri=str(tiny_parent), metadata={})
    serving = tmp_path / "serving" / "child-v1"

    served = export_component.python_func(
        child=child, export=export, report=report, export_config={}, serving_uri=str(serving)
    )

    assert served == str(serving)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"
    assert "# " in (tmp_path / "report").read_text()
    copied = json.loads((serving / "manifest.json").read_text())
    assert copied["kind"] == "export"
    assert copied["content_hash"] == export.metadata["content_hash"]
    assert sorted(p.name for p in serving.iterdir()) == sorted(
        p.name for p in (tmp_path / "export").iterdir()
    )
    assert export.metadata["serving_uri"] == str(serving)


def test_export_again_does_not_copy_twice(tiny_parent: Path, tmp_path: Path) -> None:
    from components import _runtime

    export, report = _outputs(tmp_path)
    child = dsl.Model(name="child", uri=str(tiny_parent), metadata={})
    serving = tmp_path / "serving"
    export_component.python_func(
        child=child, export=export, report=report, export_config={}, serving_uri=str(serving)
    )

    assert _runtime.copy_artifact(export.path, str(serving)) is False


def test_export_without_serving_prefix_returns_artifact_uri(tiny_parent: Path, tmp_path: Path) -> None:
    export, report = _outputs(tmp_path)
    child = dsl.Model(name="child", uri=str(tiny_parent), metadata={})

    served = export_component.python_func(
        child=child, export=export, report=report, export_config={"dtype": "bfloat16"}, serving_uri=""
    )

    assert served == export.uri
    assert export.metadata["dtype"] == "bfloat16"
