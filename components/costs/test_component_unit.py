"""The costs component measures every sub-block of the library on this machine and names the hardware."""

from __future__ import annotations

from pathlib import Path

import pytest
from kfp import dsl

from components.costs.component import costs as costs_component


def test_costs_covers_every_subblock(tiny_library: Path, tiny_parent: Path, tmp_path: Path) -> None:
    from puzzle.search.costs import load_costs

    costs = dsl.Artifact(name="costs", uri=str(tmp_path / "costs"), metadata={})

    costs_component.python_func(
        library=dsl.Model(name="library", uri=str(tiny_library), metadata={}),
        parent=dsl.Model(name="parent", uri=str(tiny_parent), metadata={}),
        costs=costs,
        # list items in pipeline dicts may arrive as floats
        costs_config={"batch_sizes": [1.0, 2.0], "prompt_len": 4, "gen_len": 3, "repeats": 1},
        device="cpu",
    )

    table = load_costs(tmp_path / "costs")
    assert table.batch_sizes == [1, 2]
    assert table.hardware["device_type"] == "cpu" and table.hardware["device_name"]
    assert costs.metadata["device_name"] == table.hardware["device_name"]  # the hardware is on the artifact
    names = set(table.data["subblocks"])
    assert {"attn_kv2", "attn_kv1", "attn_noop", "ffn_256", "ffn_noop"} <= names
    assert costs.metadata["kind"] == "costs"


def test_costs_rejects_an_empty_workload(tiny_library: Path, tiny_parent: Path, tmp_path: Path) -> None:
    from puzzle.errors import PuzzleError

    with pytest.raises(PuzzleError):
        costs_component.python_func(
            library=dsl.Model(name="library", uri=str(tiny_library), metadata={}),
            parent=dsl.Model(name="parent", uri=str(tiny_parent), metadata={}),
            costs=dsl.Artifact(name="costs", uri=str(tmp_path / "costs"), metadata={}),
            costs_config={"batch_sizes": []},
            device="cpu",
        )
