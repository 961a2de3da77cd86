"""The scoring merge joins every scoring shard into one table with a heatmap page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.scoring_merge.component import scoring_merge


def test_scoring_merge_joins_every_shard(tiny_score_shards: list[Path], tmp_path: Path) -> None:
    scores = dsl.Artifact(name="scores", uri=str(tmp_path / "scores"), metadata={})
    heatmap = dsl.HTML(name="heatmap", uri=str(tmp_path / "heatmap.html"), metadata={})

    scoring_merge.python_func(
        shards=[dsl.Artifact(name="scores", uri=str(p), metadata={}) for p in tiny_score_shards],
        scores=scores,
        heatmap=heatmap,
    )

    rows = json.loads((tmp_path / "scores" / "scores.json").read_text())["rows"]
    assert len(rows) == 15 and len({(r["layer"], r["block"]) for r in rows}) == 15
    assert "data:image/png;base64," in (tmp_path / "heatmap.html").read_text()
    assert scores.metadata["merged_shards"] == 2


def test_scoring_merge_refuses_a_missing_shard(tiny_score_shards: list[Path], tmp_path: Path) -> None:
    from puzzle.errors import PuzzleError

    with pytest.raises(PuzzleError, match="exactly once"):
        scoring_merge.python_func(
            shards=[dsl.Artifact(name="scores", uri=str(tiny_score_shards[0]), metadata={})],
            scores=dsl.Artifact(name="scores", uri=str(tmp_path / "scores"), metadata={}),
            heatmap=dsl.HTML(name="heatmap", uri=str(tmp_path / "heatmap.html"), metadata={}),
        )
