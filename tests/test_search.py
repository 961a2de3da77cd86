"""The architecture search: exact on small libraries, diverse, clear about impossible requests."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from search_tables import PARENT, write_costs, write_scores

from puzzle.config import SearchConfig
from puzzle.search.costs import load_costs
from puzzle.search.knapsack import InfeasibleError, Problem, solve
from puzzle.search.mip import Constraint, InfeasibleConstraintError, SearchError, load_solutions, search
from puzzle.search.tables import build_table, load_scores, read_library


def brute_force(problem: Problem) -> float:
    """The best objective over every architecture (numpy, all combinations at once)."""
    L, V = problem.score.shape
    combos = np.array(list(itertools.product(*[np.flatnonzero(problem.valid[layer]) for layer in range(L)])))
    layers = np.arange(L)
    score = problem.score[layers, combos].sum(axis=1)
    used = problem.coef[:, layers, combos].sum(axis=2)  # [K, combos]
    ok = np.all(used <= problem.limit[:, None] + 1e-9, axis=0)
    return float(score[ok].min()) if ok.any() else float("nan")


@pytest.mark.parametrize("seed", range(8))
def test_solver_equals_brute_force_on_random_libraries(seed: int) -> None:
    rng = np.random.default_rng(seed)
    L, V, K = 6, 5, 1 + seed % 3
    score = rng.random((L, V))
    coef = rng.random((K, L, V))
    valid = rng.random((L, V)) > 0.15
    valid[:, 0] = True
    # Limits between the cheapest and the dearest architecture: binding but feasible.
    lo = np.where(valid[None], coef, np.inf).min(axis=2).sum(axis=1)
    hi = np.where(valid[None], coef, -np.inf).max(axis=2).sum(axis=1)
    limit = lo + rng.uniform(0.2, 0.6, K) * (hi - lo)
    problem = Problem(score, coef, limit, valid)
    expected = brute_force(problem)
    if np.isnan(expected):
        with pytest.raises(InfeasibleError):
            solve(problem)
        return
    result = solve(problem)
    assert result.objective == pytest.approx(expected, abs=1e-12)
    assert result.status == "optimal"
    assert problem.is_feasible(result.choice)


@pytest.fixture
def tables(tmp_path: Path) -> tuple[Path, Path]:
    return write_scores(tmp_path / "scores.csv", 4, seed=3), write_costs(tmp_path / "costs.json", 4)


def test_search_equals_brute_force_over_every_architecture(tables: tuple[Path, Path], tmp_path: Path) -> None:
    scores, costs = tables
    out = tmp_path / "search"
    search(
        str(scores),
        str(costs),
        str(out),
        SearchConfig(constraints=["throughput>=1.6x", "memory<=0.7x"]),
        batch_size=8,
    )
    solution = load_solutions(str(out))["solutions"][0]

    table = build_table(load_scores(str(scores)), load_costs(str(costs)), objective="kl_div", batch_size=8)
    parent = table.totals(table.parent)
    best, best_blocks = np.inf, None
    for choice in itertools.product(*[range(len(n)) for n in table.names]):  # 16^4 architectures
        totals = table.totals(list(choice))
        if totals["throughput"] >= 1.6 * parent["throughput"] and totals["memory"] <= 0.7 * parent["memory"]:
            value = table.objective_value(list(choice))
            if value < best:
                best, best_blocks = value, table.blocks(list(choice))
    assert solution["objective"] == pytest.approx(best, abs=1e-12)
    assert solution["blocks"] == best_blocks
    assert solution["status"] == "optimal" and solution["method"] == "mip"
    assert solution["relative_to_parent"]["throughput"] >= 1.6 - 1e-9
    assert all(c["satisfied"] for c in solution["constraints"])


def test_decoupled_pairs_are_scored_additively_and_costs_summed(tables: tuple[Path, Path]) -> None:
    scores_path, costs_path = tables
    scores, costs = load_scores(str(scores_path)), load_costs(str(costs_path))
    assert scores.parent == [tuple(PARENT.split("+"))] * 4
    pair = scores.score(2, "attn_kv1", "ffn_64", "kl_div")
    assert pair == pytest.approx(
        scores.score(2, "attn_kv1", "ffn_256", "kl_div") + scores.score(2, "attn_kv4", "ffn_64", "kl_div")
    )
    table = build_table(scores, costs, objective="kl_div", batch_size=1)
    assert len(table.names[0]) == 16  # every attention x FFN pair is a candidate
    choice = [table.index(layer, "attn_kv1+ffn_64") for layer in range(4)]
    runtime = costs.fixed(1)["runtime_ms"] + 4 * (
        costs.subblock("attn_kv1", 1)["runtime_ms"] + costs.subblock("ffn_64", 1)["runtime_ms"]
    )
    totals = table.totals(choice)
    assert totals["latency"] == pytest.approx(runtime)
    assert totals["throughput"] == pytest.approx(1 * costs.gen_len * 1000 / runtime)


def test_diverse_solutions_differ_in_at_least_a_fifth_of_the_layers(tmp_path: Path) -> None:
    scores = write_scores(tmp_path / "scores.csv", 10, seed=1)
    costs = write_costs(tmp_path / "costs.json", 10)
    out = tmp_path / "search"
    search(
        str(scores),
        str(costs),
        str(out),
        SearchConfig(constraints=["throughput>=1.5x"], num_solutions=5, alpha=0.8),
    )
    solutions = load_solutions(str(out))["solutions"]
    assert len(solutions) == 5
    for a, b in itertools.combinations(solutions, 2):
        differing = sum(x != y for x, y in zip(a["blocks"], b["blocks"]))
        assert differing >= 2  # >= 20 % of 10 layers
    assert solutions[0]["status"] == "optimal"
    assert all(s["relative_to_parent"]["throughput"] >= 1.5 - 1e-9 for s in solutions)
    # Each further solution is at best as good as the optimum before it was excluded.
    assert all(s["objective"] >= solutions[0]["objective"] - 1e-12 for s in solutions[1:])


def test_an_unreachable_constraint_fails_before_solving_and_names_the_best_value(
    tables: tuple[Path, Path], tmp_path: Path
) -> None:
    scores, costs = tables
    out = tmp_path / "search"
    with pytest.raises(
        InfeasibleConstraintError, match=r"memory<=1'.*best any architecture.*reaches is [0-9.]+ MiB"
    ):
        search(str(scores), str(costs), str(out), SearchConfig(constraints=["memory<=1"]))
    assert not out.exists()
    with pytest.raises(SearchError, match="lower bound"):
        Constraint.parse("throughput<=3x")


def test_limits_that_only_conflict_together_are_reported_as_such() -> None:
    # Option 0 is cheap in row 0 and dear in row 1, option 1 the reverse: each limit alone can be
    # met, both together cannot.
    coef = np.array([[[0.0, 1.0]] * 3, [[1.0, 0.0]] * 3])
    problem = Problem(np.zeros((3, 2)), coef, [1.0, 1.0], np.ones((3, 2), bool))
    with pytest.raises(InfeasibleError, match="cannot all be met together"):
        solve(problem)


def test_constraint_units() -> None:
    assert Constraint.parse("memory<=2GiB").value == 2048
    assert Constraint.parse("memory<=2000").value == 2000
    assert Constraint.parse("parameters<=100M").value == 1e8
    assert Constraint.parse("params<=1e8").metric == "params"
    assert Constraint.parse("latency<=2s").value == 2000
    c = Constraint.parse("throughput>=1.5x")
    assert c.relative and c.bound({"throughput": 100.0}) == 150.0
    with pytest.raises(SearchError, match="unknown metric"):
        Constraint.parse("speed>=2x")
    with pytest.raises(SearchError, match="unknown unit"):
        Constraint.parse("memory<=2parsecs")


def test_every_batch_size_is_solved_and_the_best_kept(tables: tuple[Path, Path], tmp_path: Path) -> None:
    scores, costs = tables
    out = tmp_path / "search"
    # An absolute throughput: easy at batch 8 (the parent nearly reaches it), hard at batch 1.
    search(str(scores), str(costs), str(out), SearchConfig(constraints=["throughput>=2500"]))
    data = load_solutions(str(out))
    per_batch = data["batch_sizes"]
    assert set(per_batch) == {"1", "8"}
    if per_batch["1"]["feasible"]:
        assert per_batch["1"]["objective"] > per_batch["8"]["objective"]
    assert data["solutions"][0]["batch_size"] == 8
    assert data["solutions"][0]["totals"]["throughput"] >= 2500


def test_sweep_writes_a_pareto_table_and_plot(tables: tuple[Path, Path], tmp_path: Path) -> None:
    scores, costs = tables
    out = tmp_path / "sweep"
    # A search needs a constraint: "at least the parent's speed" binds no sweep point.
    sweep_config = SearchConfig(constraints=["throughput>=1x"])
    search(str(scores), str(costs), str(out), sweep_config, batch_size=8, sweep="throughput>=1x:2.5x:4")
    rows = (out / "pareto.csv").read_text().splitlines()
    assert rows[0].startswith("sweep,objective")
    objectives = [float(r.split(",")[1]) for r in rows[1:]]
    assert len(objectives) == 4 and objectives == sorted(objectives)  # faster costs more
    assert (out / "pareto.png").stat().st_size > 1000


def test_published_library_format_is_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    library = {}
    for layer in range(5):
        variants = {}
        for kv, ffn in itertools.product([8, 0], [28672, 14336, 0]):
            attn = f"{kv} kv heads (parent * 100%)" if kv else "no_op (parent * 0%)"
            f = (
                f"intermediate size {ffn // 1000}e3 (parent * {ffn * 100 // 28672}%)"
                if ffn
                else "no_op (parent * 0%)"
            )
            runtime = 350.0 * bool(kv) + 460.0 * ffn / 28672
            parent = kv == 8 and ffn == 28672
            variants[f"attention = {attn}\t&&\tffn = {f}"] = {
                "stats": {
                    "num_kv_heads": kv,
                    "ffn_intermediate_size": ffn,
                    "memory_mib": runtime * 2,
                    "runtime_ms": runtime,
                    "num_params": int(runtime * 1e6),
                },
                "metrics": {"kl_div": 0.0 if parent else float(rng.random()), "lm_loss": 1.6},
            }
        library[f"layer_{layer}"] = variants
    path = tmp_path / "block_library.json"
    path.write_text(json.dumps(library))
    table = read_library(str(path))
    assert table.names[0][table.parent[0]] == "attn_kv8+ffn_28672"
    assert "attn_noop+ffn_noop" in table.names[0] and "attn_kv8+ffn_14336" in table.names[0]
    out = tmp_path / "search"
    search(None, None, str(out), SearchConfig(constraints=["latency<=0.5x"]), library=str(path))
    best = load_solutions(str(out))["solutions"][0]
    assert best["status"] == "optimal"
    assert best["totals"]["latency_ms"] <= 0.5 * 5 * 810.0 + 1e-6


def test_cli_search_prints_the_solution(
    tables: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from puzzle.cli import main
    from puzzle.search import refine

    scores, costs = tables

    # These costs are made up (no model has their shapes): the whole-model measurement reports the
    # table's own prediction; tests/test_refine.py and tests/test_method_smollm2.py cover the rest.
    def predicted(cost_table, blocks, constraints, table, device):  # noqa: ANN001, ARG001
        sizes = {c.batch_size or table.batch_size for c in constraints} | {table.batch_size}
        out = {}
        for b in sorted(sizes):
            t = build_table(load_scores(str(scores)), cost_table, objective="kl_div", batch_size=b)
            totals = t.totals([t.index(layer, block) for layer, block in enumerate(blocks)])
            out[b] = {"throughput": totals["throughput"], "latency": totals["latency"]}
        return out

    monkeypatch.setattr(refine, "_measure", predicted)
    tables_only = ["no-library", "no-parent", "no-tokens", "--set", "scoring.mode=decoupled"]
    tables_only += ["--set", "bld.coupled=none"]
    code = main(
        [
            "search",
            str(scores),
            str(costs),
            *tables_only,
            "--out",
            str(tmp_path / "s"),
            "--set",
            "search.constraints=['throughput>=1.5x']",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "optimal" in printed and "tokens/s" in printed
    code = main(
        [
            "search",
            str(scores),
            str(costs),
            *tables_only,
            "--out",
            str(tmp_path / "t"),
            "--set",
            "search.constraints=['memory<=1']",
        ]
    )
    assert code == 2
    assert "memory<=1" in capsys.readouterr().err
