"""The convert component turns a parent into a child artifact and records its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.convert.component import convert


def test_convert_writes_child_artifact_with_metadata(tiny_parent_factory, tmp_path: Path) -> None:
    parent = tiny_parent_factory("llama")
    child = dsl.Model(name="child", uri=str(tmp_path / "child"), metadata={})

    convert.python_func(parent=str(parent), child=child, dtype="float32")

    manifest = json.loads((tmp_path / "child" / "manifest.json").read_text())
    assert manifest["kind"] == "child"
    config = json.loads((tmp_path / "child" / "config.json").read_text())
    assert len(config["block_configs"]) == 3
    assert child.metadata["kind"] == "child"
    assert child.metadata["content_hash"] == manifest["content_hash"]
    assert child.metadata["num_layers"] == 3
    assert child.metadata["size_bytes"] > 0
    assert child.metadata["parent"] == str(parent)


def test_convert_rejects_unknown_parent_before_loading(tmp_path: Path) -> None:
    from puzzle.errors import PuzzleError

    child = dsl.Model(name="child", uri=str(tmp_path / "child"), metadata={})
    with pytest.raises(PuzzleError, match="not a local path"):
        convert.python_func(parent="./no/such/parent", child=child)
    assert not (tmp_path / "child").exists()
