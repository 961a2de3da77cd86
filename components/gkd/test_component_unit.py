"""The gkd component trains the realized child against the parent and records the run."""

from __future__ import annotations

import json
from pathlib import Path

from kfp import dsl

from components.gkd.component import gkd


def test_gkd_trains_for_the_token_budget(
    tiny_realized: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    distilled = dsl.Model(name="distilled", uri=str(tmp_path / "distilled"), metadata={})

    gkd.python_func(
        child=dsl.Model(name="child", uri=str(tiny_realized), metadata={}),
        parent=dsl.Model(name="parent", uri=str(tiny_parent), metadata={}),
        tokens=dsl.Dataset(name="tokens", uri=str(tiny_tokens), metadata={}),
        distilled=distilled,
        gkd_config={"token_budget": 256, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 1},
        device="cpu",
    )

    manifest = json.loads((tmp_path / "distilled" / "manifest.json").read_text())
    assert manifest["kind"] == "child"
    # 256 tokens / (4 sequences x 32 tokens) = 2 steps
    assert manifest["summary"]["steps"] == 2
    assert distilled.metadata["steps"] == 2
    assert (tmp_path / "distilled" / "config.json").read_text() != ""
