"""Baselines: simple architecture choices at the search's constraints, in the search's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from search_tables import write_costs, write_scores

from puzzle.config import DataConfig, SearchConfig
from puzzle.search.baselines import baseline, block_influence
from puzzle.search.costs import load_costs
from puzzle.search.mip import load_solutions, search
from puzzle.search.tables import build_table, load_scores

CONSTRAINT = "throughput>=1.6x"
SEARCH = SearchConfig(constraints=[CONSTRAINT])


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    root = tmp_path_factory.mktemp("baseline-tables")
    scores = write_scores(root / "scores.csv", 6, seed=2)
    costs = write_costs(root / "costs.json", 6)
    search(str(scores), str(costs), str(root / "mip"), SEARCH, batch_size=8)
    return str(scores), str(costs), root


def _best(out: Path) -> dict:
    data = load_solutions(str(out))
    assert data["solutions"][0]["rank"] == 1
    return data["solutions"][0]


def test_greedy_meets_the_constraint_and_is_never_better_than_the_search(tables, tmp_path: Path) -> None:
    scores, costs, root = tables
    baseline("greedy", scores, costs, str(tmp_path / "greedy"), SEARCH, batch_size=8)
    greedy, optimum = _best(tmp_path / "greedy"), _best(root / "mip")
    assert greedy["method"] == "greedy"
    assert all(c["satisfied"] for c in greedy["constraints"])
    assert greedy["objective"] >= optimum["objective"] - 1e-12
    assert len(greedy["blocks"]) == 6


def test_noop_only_uses_parent_or_noop_sub_blocks(tables, tmp_path: Path) -> None:
    scores, costs, root = tables
    baseline("noop_only", scores, costs, str(tmp_path / "noop"), SEARCH, batch_size=8)
    sol = _best(tmp_path / "noop")
    assert sol["method"] == "noop_only" and sol["status"] == "optimal"
    for block in sol["blocks"]:
        attn, ffn = block.split("+")
        assert attn in ("attn_kv4", "attn_noop") and ffn in ("ffn_256", "ffn_noop")
    assert any("noop" in b for b in sol["blocks"])
    assert sol["objective"] >= _best(root / "mip")["objective"] - 1e-12
    assert all(c["satisfied"] for c in sol["constraints"])


def test_uniform_width_is_the_best_uniform_block_that_meets_the_constraint(tables, tmp_path: Path) -> None:
    scores, costs, _ = tables
    baseline("uniform_width", scores, costs, str(tmp_path / "uniform"), SEARCH, batch_size=8)
    sol = _best(tmp_path / "uniform")
    assert len(set(sol["blocks"])) == 1 and "noop" not in sol["blocks"][0]  # a width, not a skipped block
    assert all(c["satisfied"] for c in sol["constraints"])

    table = build_table(load_scores(scores), load_costs(costs), objective="kl_div", batch_size=8)
    parent = table.totals(table.parent)["throughput"]
    uniform = [
        [table.index(layer, block) for layer in range(6)] for block in table.names[0] if "noop" not in block
    ]
    best = min(table.objective_value(c) for c in uniform if table.totals(c)["throughput"] >= 1.6 * parent)
    assert sol["objective"] == pytest.approx(best)


def _unreachable(path: Path) -> str:
    data = json.loads((path / "solutions.json").read_text())
    assert data["solutions"] == []
    return data["unreachable"]


def test_a_baseline_that_cannot_meet_the_constraint_says_so_instead_of_degenerating(
    tables, tmp_path: Path
) -> None:
    scores, costs, _ = tables
    search = SearchConfig(constraints=["throughput>=50x"])
    manifest = baseline("uniform_width", scores, costs, str(tmp_path / "u50"), search, batch_size=8)
    assert manifest.summary["reachable"] is False
    assert "throughput>=50x" in _unreachable(tmp_path / "u50")
    # Reachable by mixing blocks or by skipping attention everywhere, but not with one width
    # repeated in every layer: said so, not "no attention anywhere" presented at the same speed.
    table = build_table(load_scores(scores), load_costs(costs), objective="kl_div", batch_size=8)
    parent = table.totals(table.parent)["throughput"]
    fastest_width = max(
        table.totals([table.index(layer, b) for layer in range(6)])["throughput"]
        for b in table.names[0]
        if "noop" not in b
    )
    mixed = [
        table.index(layer, "attn_noop+ffn_noop" if layer < 3 else "attn_noop+ffn_64") for layer in range(6)
    ]
    bound = (fastest_width + table.totals(mixed)["throughput"]) / 2 / parent
    search = SearchConfig(constraints=[f"throughput>={bound:.4f}x"])
    baseline("uniform_width", scores, costs, str(tmp_path / "u"), search, batch_size=8)
    assert "uniform_width: no single width" in _unreachable(tmp_path / "u")
    baseline("greedy", scores, costs, str(tmp_path / "g"), search, batch_size=8)  # mixing reaches it
    assert _best(tmp_path / "g")["relative_to_parent"]["throughput"] >= bound * (1 - 1e-9)


def test_an_identity_layer_has_zero_block_influence(tiny_parent: Path) -> None:
    from puzzle.modeling.checkpoints import load_model

    model = load_model(tiny_parent, dtype="float32")
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: output == input
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = torch.randint(3, 256, (4, 16))
    influence = block_influence(model, ids, batch_size=2)
    assert len(influence) == 3
    assert influence[1] == pytest.approx(0.0, abs=1e-6)
    assert min(influence[0], influence[2]) > 1e-3


def test_layer_dropping_drops_the_least_influential_layers(tiny_parent: Path, tmp_path: Path) -> None:
    from puzzle.data import prepare

    tokens = tmp_path / "tokens"
    prepare(str(tiny_parent), str(tokens), DataConfig(seq_len=16, splits={"calibration": 4}))
    scores = write_scores(tmp_path / "scores.csv", 3)
    costs = write_costs(tmp_path / "costs.json", 3)
    out = tmp_path / "drop"
    baseline(
        "layer_dropping",
        str(scores),
        str(costs),
        str(out),
        SearchConfig(constraints=["throughput>=1.3x"]),
        batch_size=8,
        parent=str(tiny_parent),
        tokens=str(tokens),
    )
    sol = _best(out)
    influence, dropped = sol["block_influence"], sol["dropped_layers"]
    assert 1 <= len(dropped) < 3
    assert max(influence[i] for i in dropped) <= min(influence[i] for i in range(3) if i not in dropped)
    for layer, block in enumerate(sol["blocks"]):
        assert (block == "attn_noop+ffn_noop") == (layer in dropped)
    assert all(c["satisfied"] for c in sol["constraints"])
    assert load_solutions(str(out))["method"] == "layer_dropping"
