"""The merge component joins every BLD shard into one complete, trained library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.bld_merge.component import bld_merge


def test_bld_merge_joins_every_shard(tiny_library: Path, tiny_bld_shards: list[Path], tmp_path: Path) -> None:
    trained = dsl.Model(name="trained", uri=str(tmp_path / "library"), metadata={})

    bld_merge.python_func(
        library=dsl.Model(name="library", uri=str(tiny_library), metadata={}),
        shards=[dsl.Model(name="trained", uri=str(p), metadata={}) for p in tiny_bld_shards],
        trained=trained,
    )

    meta = json.loads((tmp_path / "library" / "library.json").read_text())
    trained_variants = {
        (layer, name)
        for layer, entry in meta["layers"].items()
        for name, info in entry["variants"].items()
        if info.get("trained")
    }
    assert trained_variants == {
        (str(layer), name) for layer in range(3) for name in ("attn_kv1", "attn_linear")
    }
    assert trained.metadata["merged_shards"] == 2
    assert trained.metadata["partial"] is False


def test_bld_merge_refuses_a_missing_shard(
    tiny_library: Path, tiny_bld_shards: list[Path], tmp_path: Path
) -> None:
    from puzzle.errors import PuzzleError

    with pytest.raises(PuzzleError, match="every shard"):
        bld_merge.python_func(
            library=dsl.Model(name="library", uri=str(tiny_library), metadata={}),
            shards=[dsl.Model(name="trained", uri=str(tiny_bld_shards[1]), metadata={})],
            trained=dsl.Model(name="trained", uri=str(tmp_path / "library"), metadata={}),
        )
