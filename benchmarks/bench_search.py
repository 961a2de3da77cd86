"""Search benchmark: exactness and speed of the MIP search (CPU).

1. The published 80 x 16 Llama-3.3-70B block library (`--library PATH`; not in this repository):
   minimise summed kl_div with runtime <= 50 % (and 60 %) of the parent's summed runtime;
   objective, status, how it was proven, and time (cold = first call, incl. python-mip's import
   and CBC's start; warm = median of the next runs).
2. 10 diverse solutions (alpha = 0.8) on the same library: total time, each one's objective,
   status and remaining gap, and the smallest pairwise difference in layers.
3. Synthetic 200 layers x 50 variants: a Puzzle-like library (scores grow as variants shrink)
   and an unstructured random one.
4. ``--plain-cbc``: the same 80 x 16 problem given to CBC directly (gap 0), for comparison.

    .venv/bin/python benchmarks/bench_search.py [--library PATH] [--plain-cbc]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from puzzle.config import SearchConfig  # noqa: E402
from puzzle.search import knapsack  # noqa: E402
from puzzle.search.mip import Constraint, load_solutions, make_problem, search  # noqa: E402
from puzzle.search.tables import read_library  # noqa: E402

DEFAULT_LIBRARY = (
    Path(__file__).resolve().parents[2] / "shared/data/llama-3.3-70b-block-library/block_library.json"
)


def library_runs(path: Path, repeats: int) -> None:
    table = read_library(str(path))
    print(f"library: {path.name}, {table.num_layers} layers x {table.valid.sum(axis=1).max()} variants")
    for fraction in (0.5, 0.6):
        problem = make_problem(table, [Constraint.parse(f"latency<={fraction}x")], maximize=False)
        times, result = [], None
        for _ in range(repeats + 1):
            result = knapsack.solve(problem)
            times.append(result.seconds)
        assert result is not None
        s = result.stats
        print(
            f"  runtime <= {fraction:.0%} of the parent: kl_div {result.objective:.6f}, {result.status} "
            f"(proof: {s['proof']}; CBC: {s['cbc_status']} {s['cbc_objective']:.6f}), cold {times[0]:.3f} s, "
            f"warm median {statistics.median(times[1:]):.3f} s [LP {s['lp_bound']:.6f}, heuristic "
            f"{s['heuristic_objective']:.6f}, DP gaps tried {len(s['dp_gaps'])}, "
            f"{s['mip_variables']} MIP vars]"
        )


def diverse_run(path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        search(
            None,
            None,
            f"{tmp}/out",
            SearchConfig(constraints=["latency<=0.5x"], num_solutions=10, alpha=0.8),
            library=str(path),
        )
        elapsed = time.perf_counter() - started
        solutions = load_solutions(f"{tmp}/out")["solutions"]
    diffs = [
        sum(a != b for a, b in zip(x["blocks"], y["blocks"])) for x, y in itertools.combinations(solutions, 2)
    ]
    print(
        f"  10 diverse solutions (alpha 0.8): {elapsed:.2f} s in all, smallest pairwise difference "
        f"{min(diffs)} of {len(solutions[0]['blocks'])} layers"
    )
    for s in solutions:
        gap = s["solver"].get("gap", 0.0)
        print(
            f"    #{s['rank']:>2}: kl_div {s['objective']:.6f} {s['status']:<8} gap {gap:.2e} "
            f"({s['solve_seconds']:.2f} s)"
        )


def synthetic(L: int, V: int, kind: str, seed: int = 0) -> knapsack.Problem:
    rng = np.random.default_rng(seed)
    if kind == "random":
        score, runtime = rng.random((L, V)), rng.random((L, V))
        limit = 0.5 * runtime.mean(axis=1).sum()
    else:
        frac = np.sort(rng.uniform(0, 1, (L, V)), axis=1)[:, ::-1]
        frac[:, 0] = 1.0
        runtime = frac * rng.uniform(0.8, 1.2, (L, 1)) + rng.normal(0, 0.01, (L, V))
        score = rng.lognormal(0, 1, (L, 1)) * (1 - frac) ** 1.5 + rng.exponential(0.01, (L, V))
        score[:, 0] = 0.0
        limit = 0.5 * runtime[:, 0].sum()
    return knapsack.Problem(score, runtime[None], [limit], np.ones((L, V), bool))


def synthetic_runs() -> None:
    for kind in ("puzzle-like", "random"):
        problem = synthetic(200, 50, kind)
        result = knapsack.solve(problem)
        s = result.stats
        print(
            f"  synthetic 200 x 50 ({kind}): objective {result.objective:.6f}, {result.status} "
            f"(proof {s['proof']}), "
            f"{result.seconds:.3f} s [{s['mip_variables']} MIP vars]"
        )


def plain_cbc(path: Path) -> None:
    import mip

    table = read_library(str(path))
    problem = make_problem(table, [Constraint.parse("latency<=0.5x")], maximize=False)
    for gap in (1e-4, 0.0):
        with knapsack.mip_session():
            model = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
            model.verbose = 0
            L, V = problem.score.shape
            x = [[model.add_var(var_type=mip.BINARY) for _ in range(V)] for _ in range(L)]
            for layer in range(L):
                model += mip.xsum(x[layer]) == 1
            model += mip.xsum(
                float(problem.coef[0, i, j]) * x[i][j] for i in range(L) for j in range(V)
            ) <= float(problem.limit[0])
            model.objective = mip.xsum(
                float(problem.score[i, j]) * x[i][j] for i in range(L) for j in range(V)
            )
            model.max_mip_gap, model.max_mip_gap_abs = gap, 1e-10
            started = time.perf_counter()
            status = model.optimize()
            elapsed, value = time.perf_counter() - started, model.objective_value
        print(
            f"  plain CBC on all {L * V} variables, relative gap {gap:g}: {value:.6f} ({status.name}) "
            f"in {elapsed:.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--library", type=Path, default=DEFAULT_LIBRARY)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plain-cbc", action="store_true", help="also time CBC on the unreduced model")
    args = parser.parse_args()
    if args.library.exists():
        library_runs(args.library, args.repeats)
        diverse_run(args.library)
        if args.plain_cbc:
            plain_cbc(args.library)
    else:
        print(f"no library at {args.library}: skipping the 80 x 16 runs")
    synthetic_runs()


if __name__ == "__main__":
    main()
