"""The data component writes disjoint token splits with the parent's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.data.component import data


def test_data_writes_every_split(tiny_parent: Path, tmp_path: Path) -> None:
    parent = dsl.Model(name="parent", uri=str(tiny_parent), metadata={})
    tokens = dsl.Dataset(name="tokens", uri=str(tmp_path / "tokens"), metadata={})
    # Numbers in pipeline dicts arrive as floats; the component must accept them.
    splits = {"calibration": 2.0, "bld": 4.0, "score": 2.0, "gkd": 2.0, "eval": 2.0}

    data.python_func(
        parent=parent,
        tokens=tokens,
        data_config={"source": "stdlib", "seq_len": 16.0, "splits": splits, "seed": 1},
    )

    info = json.loads((tmp_path / "tokens" / "splits.json").read_text())
    # Plus the out-of-domain evaluation split (data.ood_source: english, ood_sequences: 16 by default).
    assert {name: s["sequences"] for name, s in info["splits"].items()} == {
        **{k: int(v) for k, v in splits.items()},
        "eval_ood": 16,
    }
    assert info["seq_len"] == 16
    assert tokens.metadata["kind"] == "tokens"
    assert tokens.metadata["sequences_bld"] == 4


def test_data_rejects_empty_split(tiny_parent: Path, tmp_path: Path) -> None:
    from puzzle.errors import PuzzleError

    parent = dsl.Model(name="parent", uri=str(tiny_parent), metadata={})
    tokens = dsl.Dataset(name="tokens", uri=str(tmp_path / "tokens"), metadata={})
    with pytest.raises(PuzzleError):
        data.python_func(
            parent=parent,
            tokens=tokens,
            data_config={"source": "stdlib", "seq_len": 16, "splits": {"bld": 0}},
        )
