"""The BLD component trains exactly its shard of the library's trainable variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.bld.component import bld
from components.conftest import TINY_BLD


def _trained_variants(library: Path) -> set[tuple[str, str]]:
    meta = json.loads((library / "library.json").read_text())
    return {(layer, name) for layer, entry in meta["layers"].items() for name in entry["variants"]}


def test_bld_trains_its_shard(
    tiny_library: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    trained = dsl.Model(name="trained", uri=str(tmp_path / "shard"), metadata={})

    bld.python_func(
        library=dsl.Model(name="library", uri=str(tiny_library), metadata={}),
        parent=dsl.Model(name="parent", uri=str(tiny_parent), metadata={}),
        tokens=dsl.Dataset(name="tokens", uri=str(tiny_tokens), metadata={}),
        trained=trained,
        bld_config={**TINY_BLD, "shards": 2.0},  # numbers in pipeline dicts may arrive as floats
        shard_index=1.0,  # a ParallelFor item can arrive as a float
        device="cpu",
    )

    # 3 layers x (attn_kv1, attn_linear): shard 1 of 2 holds the second half.
    assert _trained_variants(tmp_path / "shard") == {
        ("1", "attn_linear"),
        ("2", "attn_kv1"),
        ("2", "attn_linear"),
    }
    assert trained.metadata["shard"] == "1/2"
    assert trained.metadata["partial"] is True
    assert trained.metadata["mean_final_nmse"] < trained.metadata["mean_initial_nmse"]


def test_bld_rejects_a_budget_larger_than_the_data(
    tiny_library: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    from puzzle.errors import PuzzleError

    with pytest.raises(PuzzleError, match="too little data"):
        bld.python_func(
            library=dsl.Model(name="library", uri=str(tiny_library), metadata={}),
            parent=dsl.Model(name="parent", uri=str(tiny_parent), metadata={}),
            tokens=dsl.Dataset(name="tokens", uri=str(tiny_tokens), metadata={}),
            trained=dsl.Model(name="trained", uri=str(tmp_path / "shard"), metadata={}),
            bld_config={"token_budget": 10**6, "shards": 1},
            shard_index=0,
        )
