"""The scoring component scores exactly its shard of the library's blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.conftest import TINY_METRICS
from components.score.component import score_blocks


def _inputs(library: Path, child: Path, tokens: Path) -> dict[str, dsl.Artifact]:
    return {
        "library": dsl.Model(name="library", uri=str(library), metadata={}),
        "child": dsl.Model(name="child", uri=str(child), metadata={}),
        "tokens": dsl.Dataset(name="tokens", uri=str(tokens), metadata={}),
    }


def test_score_blocks_scores_its_shard(
    tiny_trained_library: Path, tiny_child: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    scores = dsl.Artifact(name="scores", uri=str(tmp_path / "scores"), metadata={})

    score_blocks.python_func(
        shard_index=0.0,
        num_shards=2,
        metrics=TINY_METRICS,
        scores=scores,
        batch_size=4,
        device="cpu",
        **_inputs(tiny_trained_library, tiny_child, tiny_tokens),
    )

    rows = json.loads((tmp_path / "scores" / "scores.json").read_text())["rows"]
    # Decoupled mode: per layer 4 attention + 2 FFN variants, the parent's block counted once = 5 rows;
    # 15 rows over 3 layers, the first shard of 2 holds 7.
    assert len(rows) == 7
    parent_rows = [r for r in rows if r["block"] == "attn_kv2+ffn_256"]
    assert parent_rows and all(abs(r["kl_div"]) < 1e-5 for r in parent_rows)
    noop_rows = [r for r in rows if r["attention"] == "attn_noop"]
    assert noop_rows and all(r["kl_div"] > 0 for r in noop_rows)
    assert scores.metadata["shard"] == "0/2"


def test_score_blocks_rejects_unknown_metric(
    tiny_trained_library: Path, tiny_child: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    from puzzle.errors import PuzzleError

    with pytest.raises(PuzzleError, match="bleu"):
        score_blocks.python_func(
            shard_index=0,
            num_shards=1,
            metrics=["bleu"],
            scores=dsl.Artifact(name="scores", uri=str(tmp_path / "scores"), metadata={}),
            **_inputs(tiny_trained_library, tiny_child, tiny_tokens),
        )
