"""The export component writes the checkpoint, its report and a copy at the serving prefix."""

from __future__ import annotations

import json
from pathlib import Path

from kfp import dsl

from components.export.component import export


def _outputs(tmp_path: Path) -> tuple[dsl.Model, dsl.Markdown]:
    return (
        dsl.Model(name="checkpoint", uri=str(tmp_path / "checkpoint"), metadata={}),
        dsl.Markdown(name="report", uri=str(tmp_path / "report"), metadata={}),
    )


def test_export_publishes_checkpoint_to_serving_prefix(tiny_child: Path, tmp_path: Path) -> None:
    checkpoint, report = _outputs(tmp_path)
    child = dsl.Model(name="child", uri=str(tiny_child), metadata={})
    serving = tmp_path / "serving" / "child-v1"

    served = export.python_func(child=child, serving_uri=str(serving), checkpoint=checkpoint, report=report)

    assert served == str(serving)
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"
    assert "# " in (tmp_path / "report").read_text()
    copied = json.loads((serving / "manifest.json").read_text())
    assert copied["kind"] == "export"
    assert copied["content_hash"] == checkpoint.metadata["content_hash"]
    assert sorted(p.name for p in serving.iterdir()) == sorted(
        p.name for p in (tmp_path / "checkpoint").iterdir()
    )
    assert checkpoint.metadata["serving_uri"] == str(serving)


def test_export_again_does_not_copy_twice(tiny_child: Path, tmp_path: Path) -> None:
    from components import _runtime

    checkpoint, report = _outputs(tmp_path)
    child = dsl.Model(name="child", uri=str(tiny_child), metadata={})
    serving = tmp_path / "serving"
    export.python_func(child=child, serving_uri=str(serving), checkpoint=checkpoint, report=report)

    assert _runtime.copy_artifact(checkpoint.path, str(serving)) is False


def test_export_without_serving_prefix_returns_artifact_uri(tiny_child: Path, tmp_path: Path) -> None:
    checkpoint, report = _outputs(tmp_path)
    child = dsl.Model(name="child", uri=str(tiny_child), metadata={})

    served = export.python_func(
        child=child, serving_uri="", checkpoint=checkpoint, report=report, dtype="bfloat16"
    )

    assert served == checkpoint.uri
    assert checkpoint.metadata["dtype"] == "bfloat16"
