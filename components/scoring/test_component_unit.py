"""The scoring component scores exactly its shard of the library's blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.conftest import TINY_METRICS
from components.scoring.component import scoring


def _inputs(library: Path, parent: Path, tokens: Path) -> dict[str, dsl.Artifact]:
    return {
        "library": dsl.Model(name="library", uri=str(library), metadata={}),
        "parent": dsl.Model(name="parent", uri=str(parent), metadata={}),
        "tokens": dsl.Dataset(name="tokens", uri=str(tokens), metadata={}),
    }


def test_scoring_scores_its_shard(
    tiny_trained_library: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    scores = dsl.Artifact(name="scores", uri=str(tmp_path / "scores"), metadata={})

    scoring.python_func(
        scores=scores,
        scoring_config={"metrics": TINY_METRICS, "batch_size": 4, "shards": 2},
        shard_index=0.0,
        device="cpu",
        **_inputs(tiny_trained_library, tiny_parent, tiny_tokens),
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


def test_scoring_rejects_unknown_metric(
    tiny_trained_library: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    from puzzle.errors import PuzzleError

    with pytest.raises(PuzzleError, match="bleu"):
        scoring.python_func(
            scores=dsl.Artifact(name="scores", uri=str(tmp_path / "scores"), metadata={}),
            scoring_config={"metrics": ["bleu"], "shards": 1},
            shard_index=0,
            **_inputs(tiny_trained_library, tiny_parent, tiny_tokens),
        )
