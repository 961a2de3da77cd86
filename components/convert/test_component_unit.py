"""The convert component turns a parent into a parent artifact and records its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.convert.component import convert


def test_convert_writes_parent_artifact_with_metadata(tiny_parent_factory, tmp_path: Path) -> None:
    source = tiny_parent_factory("llama")
    parent = dsl.Model(name="parent", uri=str(tmp_path / "parent"), metadata={})

    convert.python_func(parent_uri=str(source), parent=parent)

    manifest = json.loads((tmp_path / "parent" / "manifest.json").read_text())
    assert manifest["kind"] == "parent"
    config = json.loads((tmp_path / "parent" / "config.json").read_text())
    assert len(config["block_configs"]) == 3
    assert parent.metadata["kind"] == "parent"
    assert parent.metadata["content_hash"] == manifest["content_hash"]
    assert parent.metadata["num_layers"] == 3
    assert parent.metadata["size_bytes"] > 0
    assert parent.metadata["parent"] == str(source)


def test_convert_rejects_unknown_parent_before_loading(tmp_path: Path) -> None:
    from puzzle.errors import PuzzleError

    parent = dsl.Model(name="parent", uri=str(tmp_path / "parent"), metadata={})
    with pytest.raises(PuzzleError, match="not a local path"):
        convert.python_func(parent_uri="./no/such/parent", parent=parent)
    assert not (tmp_path / "parent").exists()
