"""Architecture search (Puzzle phase 6): one block per layer, best summed score under limits.

:func:`search` joins replace-1-block scores with measured costs (or reads a published block
library), builds the grouped knapsack for each batch size and solves it exactly with
:mod:`puzzle.search.knapsack` (python-mip / CBC plus exact reductions), keeping the batch size whose
optimum is best. Constraints, any combination::

    throughput>=1.5x     tokens/s, or a multiple of the parent's at the same batch size
    latency<=900         ms per request (prefill + every decode step); also 2s, 0.5x
    memory<=2000         MiB of weights + KV cache; also 2GiB, 0.8x
    params<=1e8          parameters; also 100M, 0.5x

``num_solutions`` > 1 returns diverse solutions: each shares at most ``alpha * layers`` block
choices with every earlier one. ``sweep`` (e.g. ``throughput>=1x:3x:9``) solves once per value
and writes ``pareto.csv`` and ``pareto.png`` (score against throughput). The output is a
``solutions`` artifact whose ``solutions.json`` the realize phase and the evaluation read.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from puzzle.config import SearchConfig
from puzzle.errors import PuzzleError
from puzzle.io import storage
from puzzle.io.artifacts import Manifest, run_phase
from puzzle.search.knapsack import InfeasibleError, Problem, solve
from puzzle.search.tables import (
    BlockTable,
    TableError,
    build_table,
    default_maximize,
    load_scores,
    metric_key,
    read_library,
)

log = logging.getLogger(__name__)

SOLUTIONS_KIND = "solutions"
SOLUTIONS_JSON = "solutions.json"
PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"

# metric -> (direction, unit word, row in BlockTable.cost)
METRICS: dict[str, tuple[str, str, str]] = {
    "throughput": (">=", "tokens/s", "latency"),
    "latency": ("<=", "ms", "latency"),
    "memory": ("<=", "MiB", "memory"),
    "params": ("<=", "parameters", "params"),
}
_METRIC_ALIASES = {
    "parameters": "params",
    "runtime": "latency",
    "mem": "memory",
    "tokens_per_s": "throughput",
}
_UNITS = {
    "latency": {"": 1.0, "ms": 1.0, "s": 1000.0},
    "memory": {
        "": 1.0,
        "mib": 1.0,
        "gib": 1024.0,
        "kib": 1 / 1024,
        "b": 1 / 2**20,
        "kb": 1e3 / 2**20,
        "mb": 1e6 / 2**20,
        "gb": 1e9 / 2**20,
    },
    "params": {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9},
    "throughput": {"": 1.0, "tok/s": 1.0},
}
_CONSTRAINT = re.compile(
    r"^\s*(?P<metric>[a-z_]+)\s*(?P<op><=|>=|<|>)\s*(?P<value>[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*"
    r"(?P<unit>[a-z/]*)\s*(?:@\s*bs\s*(?P<batch>[0-9]+))?\s*$",
    re.IGNORECASE,
)
_SWEEP = re.compile(
    r"^\s*(?P<metric>[a-z_]+)\s*(?P<op><=|>=)\s*(?P<lo>[0-9.e+-]+)(?P<u1>[a-z/]*)\s*:\s*(?P<hi>[0-9.e+-]+)(?P<u2>[a-z/]*)\s*:\s*(?P<n>[0-9]+)\s*$",
    re.IGNORECASE,
)


class SearchError(PuzzleError, ValueError):
    """A bad search request (constraint syntax, objective, options)."""


class InfeasibleConstraintError(SearchError):
    """No architecture in the table can meet the constraints; the message names the culprit."""


@dataclass(frozen=True)
class Constraint:
    """One bound, e.g. ``throughput>=1.5x``: absolute in the metric's unit, or relative to the parent."""

    metric: str
    op: str
    value: float
    relative: bool
    text: str
    batch_size: int | None = None
    """The workload (batch size of the cost table) the bound holds at, from ``@bs<N>``; None: the
    batch size the search solves at."""

    @classmethod
    def parse(cls, text: str) -> Constraint:
        match = _CONSTRAINT.match(str(text))
        if match is None:
            raise SearchError(
                f"constraint {text!r} is not '<metric><op><value>[x|unit][@bs<N>]', e.g. 'throughput>=1.5x', "
                f"'throughput>=1.5x@bs64', 'memory<=2000' (MiB), 'latency<=0.7x@bs1' (ms), 'params<=1e8'; "
                f"metrics: {', '.join(METRICS)}"
            )
        metric = _METRIC_ALIASES.get(match["metric"].lower(), match["metric"].lower())
        if metric not in METRICS:
            raise SearchError(
                f"constraint {text!r}: unknown metric {metric!r}; use one of {', '.join(METRICS)}"
            )
        op = match["op"] if len(match["op"]) == 2 else match["op"] + "="
        if op != METRICS[metric][0]:
            bound = "lower" if METRICS[metric][0] == ">=" else "upper"
            raise SearchError(
                f"constraint {text!r}: {metric} takes a {bound} bound; write "
                f"'{metric}{METRICS[metric][0]}...'"
            )
        unit = match["unit"].lower()
        value = float(match["value"])
        relative = unit == "x"
        if not relative:
            if unit not in _UNITS[metric]:
                raise SearchError(
                    f"constraint {text!r}: unknown unit {unit!r} for {metric}; use 'x' (times the parent) or "
                    "one of "
                    f"{sorted(u for u in _UNITS[metric] if u)} (no unit: {METRICS[metric][1]})"
                )
            value *= _UNITS[metric][unit]
        if value <= 0:
            raise SearchError(f"constraint {text!r} can never be met: the bound must be > 0")
        batch = int(match["batch"]) if match["batch"] else None
        if batch is not None and batch <= 0:
            raise SearchError(f"constraint {text!r}: @bs<N> needs a batch size > 0")
        return cls(metric, op, value, relative, str(text).strip(), batch)

    def bound(self, parent: dict[str, float]) -> float:
        """The absolute bound in the metric's unit (relative ones scale the parent's value)."""
        return self.value * parent[self.metric] if self.relative else self.value


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """``throughput>=1x:3x:5`` -> the metric and the constraint texts of the five points."""
    match = _SWEEP.match(text)
    if match is None:
        raise SearchError(
            f"sweep {text!r} must look like '<metric><op><from>:<to>:<points>', e.g. 'throughput>=1x:3x:9'"
        )
    n = int(match["n"])
    if n < 2:
        raise SearchError(f"sweep {text!r}: needs at least 2 points")
    unit = match["u1"] or match["u2"]
    if (match["u1"] or unit) != (match["u2"] or unit):
        raise SearchError(f"sweep {text!r}: both ends need the same unit")
    values = np.linspace(float(match["lo"]), float(match["hi"]), n)
    texts = [f"{match['metric']}{match['op']}{v:.6g}{unit}" for v in values]
    Constraint.parse(texts[0])
    return _METRIC_ALIASES.get(match["metric"].lower(), match["metric"].lower()), texts


# --------------------------------------------------------------------------- problem building


def parent_totals(table: BlockTable) -> dict[str, float]:
    return table.totals(table.parent)


def _row_for(table: BlockTable, constraint: Constraint, parent: dict[str, float]) -> tuple[np.ndarray, float]:
    """The knapsack row (coefficients [L, V], limit) that encodes one constraint."""
    bound = constraint.bound(parent)
    row = METRICS[constraint.metric][2]
    if constraint.metric == "throughput":
        latency_limit = table.tokens_per_batch * 1000.0 / bound
        return table.cost["latency"], latency_limit - table.base.get("latency", 0.0)
    return table.cost[row], bound - table.base.get(row, 0.0)


def _format(metric: str, value: float) -> str:
    return f"{value:.6g} {METRICS[metric][1]}"


def best_reachable(table: BlockTable, metric: str) -> float:
    """The best value of ``metric`` any architecture in the table reaches (ignoring other limits)."""
    row = METRICS[metric][2]
    cheapest = float(
        np.where(table.valid, table.cost[row], np.inf).min(axis=1).sum() + table.base.get(row, 0.0)
    )
    if metric == "throughput":
        return table.tokens_per_batch * 1000.0 / cheapest if cheapest > 0 else math.inf
    return cheapest


def table_for(constraint: Constraint, table: BlockTable, others: dict[int, BlockTable] | None) -> BlockTable:
    """The table a constraint is priced on: its pinned batch size's (``@bs<N>``), else ``table``."""
    if constraint.batch_size is None or constraint.batch_size == table.batch_size:
        return table
    if not others or constraint.batch_size not in others:
        have = sorted(others or {table.batch_size: table})
        raise SearchError(
            f"constraint {constraint.text!r} holds at batch size {constraint.batch_size}, but the cost table "
            f"was measured at {have}: add {constraint.batch_size} to costs.batch_sizes"
        )
    return others[constraint.batch_size]


def make_problem(
    table: BlockTable,
    constraints: list[Constraint],
    *,
    maximize: bool,
    previous: list[list[int]] | None = None,
    alpha: float = 0.8,
    others: dict[int, BlockTable] | None = None,
) -> Problem:
    """The knapsack for ``table`` (constraints pinned to another batch size are priced on ``others``);
    raises :class:`InfeasibleConstraintError` before any solving."""
    coefs, limits, names = [], [], []
    for c in constraints:
        priced = table_for(c, table, others)
        parent = parent_totals(priced)
        coef, limit = _row_for(priced, c, parent)
        best = best_reachable(priced, c.metric)
        reachable = (
            best >= c.bound(parent) * (1 - 1e-12) if c.op == ">=" else best <= c.bound(parent) * (1 + 1e-12)
        )
        if not reachable:
            rel = f" ({best / parent[c.metric]:.4g}x the parent)" if parent.get(c.metric) else ""
            raise InfeasibleConstraintError(
                f"constraint {c.text!r} cannot be met at batch size {priced.batch_size}: it asks for "
                f"{c.metric} {c.op} {_format(c.metric, c.bound(parent))}, and the best any architecture in "
                f"the table reaches is {_format(c.metric, best)}{rel}; relax the constraint or add cheaper "
                "variants"
            )
        coefs.append(coef)
        limits.append(limit)
        names.append(c.text)
    L = table.num_layers
    for k, prev in enumerate(previous or []):
        overlap = np.zeros_like(table.score)
        overlap[np.arange(L), prev] = 1.0
        coefs.append(overlap)
        limits.append(math.floor(alpha * L + 1e-9))
        names.append(f"diversity vs solution {k + 1}")
    valid = table.valid & np.isfinite(table.score)  # unscored blocks (baselines' extras) are not candidates
    score = np.where(valid, table.score, 0.0)
    if not coefs:
        coefs, limits = [np.zeros_like(score)], [0.0]
        names = ["(none)"]
    return Problem(-score if maximize else score, np.stack(coefs), np.array(limits), valid, names)


def constraint_report(
    table: BlockTable,
    constraints: list[Constraint],
    choice: list[int],
    others: dict[int, BlockTable] | None = None,
) -> list[dict[str, Any]]:
    out = []
    for c in constraints:
        priced = table_for(c, table, others)
        bound = c.bound(parent_totals(priced))
        value = priced.totals(choice)[c.metric]
        ok = value >= bound * (1 - 1e-9) if c.op == ">=" else value <= bound * (1 + 1e-9)
        out.append(
            {
                "constraint": c.text,
                "metric": c.metric,
                "op": c.op,
                "bound": bound,
                "value": value,
                "batch_size": priced.batch_size,
                "satisfied": bool(ok),
            }
        )
    return out


def describe(
    table: BlockTable,
    choice: list[int],
    constraints: list[Constraint],
    others: dict[int, BlockTable] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One solution entry of ``solutions.json``."""
    totals = table.totals(choice)
    parent = parent_totals(table)
    return {
        **fields,
        "batch_size": table.batch_size,
        "blocks": table.blocks(choice),
        "objective": table.objective_value(choice),
        "totals": {
            "throughput": totals["throughput"],
            "latency_ms": totals["latency"],
            "memory_mib": totals["memory"],
            "params": totals["params"],
            **{k: totals[k] for k in ("prefill_ms", "decode_ms") if k in totals},
        },
        "relative_to_parent": {
            m: (totals[m] / parent[m] if parent.get(m) else None)
            for m in ("throughput", "latency", "memory", "params")
        },
        "constraints": constraint_report(table, constraints, list(choice), others),
    }


# --------------------------------------------------------------------------- solving


def solve_table(
    table: BlockTable,
    constraints: list[Constraint],
    *,
    maximize: bool,
    num_solutions: int = 1,
    alpha: float = 0.8,
    time_limit: float = 60.0,
    diverse_time_limit: float = 0.8,
    others: dict[int, BlockTable] | None = None,
) -> list[dict[str, Any]]:
    """Up to ``num_solutions`` diverse solutions on one table (fewer when diversity runs out).

    The first is solved with ``time_limit`` (and is proven optimal on real libraries); each
    diverse one gets ``diverse_time_limit`` seconds: the diversity rows weaken the bounds, so
    those are usually the best found in that time, with their remaining gap recorded.
    """
    solutions: list[dict[str, Any]] = []
    previous: list[list[int]] = []
    for rank in range(num_solutions):
        problem = make_problem(
            table, constraints, maximize=maximize, previous=previous, alpha=alpha, others=others
        )
        try:
            result = solve(problem, time_limit=time_limit if rank == 0 else diverse_time_limit)
        except InfeasibleError as exc:
            if previous:
                log.warning(
                    "stopping at %d solutions: no further architecture is diverse enough (%s)", rank, exc
                )
                break
            raise InfeasibleConstraintError(
                f"constraints {[c.text for c in constraints]} cannot all be met together at batch size "
                f"{table.batch_size} ({exc}); each is reachable on its own: relax one of them"
            ) from exc
        previous.append(result.choice)
        solutions.append(
            describe(
                table,
                result.choice,
                constraints,
                others,
                rank=rank + 1,
                method="mip",
                status=result.status,
                proof=result.stats.get("proof"),
                solve_seconds=result.seconds,
                solver={k: v for k, v in result.stats.items() if k != "proof"},
            )
        )
    return solutions


def load_tables(
    scores: str, costs: str, objective: str, *, include: tuple[str, ...] = ()
) -> dict[int, BlockTable]:
    """The joined score/cost table of every measured batch size."""
    from puzzle.search.costs import CostsError, load_costs

    try:
        cost_table = load_costs(costs)
    except CostsError as exc:
        raise TableError(str(exc)) from exc
    score_table = load_scores(scores, cost_table.parent_blocks or None)
    return {
        b: build_table(score_table, cost_table, objective=objective, batch_size=b, include=include)
        for b in cost_table.batch_sizes
    }


def solve_batches(tables: dict[int, BlockTable], constraints: list[Constraint]) -> list[int]:
    """The batch sizes to solve at: every measured one, unless every constraint names its own
    (``@bs<N>``): then the first of those (the others are rows of the same problem)."""
    pinned = [c.batch_size for c in constraints if c.batch_size is not None]
    if constraints and len(pinned) == len(constraints):
        for b in pinned:
            if b not in tables:
                raise SearchError(
                    f"a constraint holds at batch size {b}, but the cost table was measured at "
                    f"{sorted(tables)}: add {b} to costs.batch_sizes"
                )
        return [pinned[0]]
    return sorted(tables)


def _tables(
    scores: str | None, costs: str | None, library: str | None, objective: str, batch_size: int | None
) -> tuple[list[BlockTable], dict[int, BlockTable]]:
    if library:
        table = read_library(library, objective=objective)
        return [table], {table.batch_size: table}
    if not scores or not costs:
        raise SearchError("the search needs both a scores table and a cost table (or --library FILE)")
    tables = load_tables(scores, costs, objective)
    if batch_size is not None and batch_size not in tables:
        raise SearchError(f"batch_size {batch_size} was not measured; the cost table has {sorted(tables)}")
    sizes = [batch_size] if batch_size is not None else sorted(tables)
    return [tables[b] for b in sizes], tables


def check_reachable(
    tables: list[BlockTable],
    constraints: list[Constraint],
    *,
    maximize: bool,
    others: dict[int, BlockTable] | None = None,
) -> None:
    """Fail before any solving when a bound is out of reach at every batch size solved at."""
    for c in constraints:
        errors = []
        for table in tables:
            try:
                make_problem(table, [c], maximize=maximize, others=others)
            except InfeasibleConstraintError as exc:
                errors.append(str(exc))
        if len(errors) == len(tables):
            raise InfeasibleConstraintError(errors[0])


def best_over_batches(
    tables: list[BlockTable],
    constraints: list[Constraint],
    *,
    maximize: bool,
    time_limit: float,
    others: dict[int, BlockTable] | None = None,
) -> tuple[BlockTable, dict[str, Any], dict[str, Any]]:
    """Solve every batch size; the best one's table and solution, and a per-batch summary."""
    summary: dict[str, Any] = {}
    best: tuple[BlockTable, dict[str, Any]] | None = None
    errors: list[str] = []
    for table in tables:
        try:
            sol = solve_table(table, constraints, maximize=maximize, time_limit=time_limit, others=others)[0]
        except InfeasibleConstraintError as exc:
            summary[str(table.batch_size)] = {"feasible": False, "reason": str(exc)}
            errors.append(str(exc))
            continue
        summary[str(table.batch_size)] = {
            "feasible": True,
            "objective": sol["objective"],
            "throughput": sol["totals"]["throughput"],
            "status": sol["status"],
            "solve_seconds": sol["solve_seconds"],
        }
        if best is None or _better(sol, best[1], maximize):
            best = (table, sol)
    if best is None:
        raise InfeasibleConstraintError(
            errors[0] if len(errors) == 1 else "no batch size is feasible:\n" + "\n".join(errors)
        )
    return best[0], best[1], summary


def _better(a: dict[str, Any], b: dict[str, Any], maximize: bool) -> bool:
    sa, sb = a["objective"], b["objective"]
    if abs(sa - sb) > 1e-12 * max(1.0, abs(sb)):
        return sa > sb if maximize else sa < sb
    return a["totals"]["throughput"] > b["totals"]["throughput"]


def _plot_pareto(rows: list[dict[str, Any]], objective: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["throughput"], r["objective"]) for r in rows if r["objective"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, "o-")
    ax.set_xlabel("predicted throughput (tokens/s)")
    ax.set_ylabel(f"summed {objective}")
    ax.set_title("Pareto front of the search")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_solutions(staging: Path, payload: dict[str, Any]) -> None:
    (staging / SOLUTIONS_JSON).write_text(json.dumps(payload, indent=2, default=float) + "\n")


def search(
    scores: str | None,
    costs: str | None,
    out: str,
    search: SearchConfig,
    *,
    library: str | None = None,
    sweep: str | None = None,
    batch_size: int | None = None,
    force: bool = False,
) -> Manifest:
    """Phase ``search``: the best architecture(s) under the constraints, as a ``solutions`` artifact.

    Args:
        scores, costs: the scores and costs artifacts (or ``scores.csv``/``costs.json`` files).
        out: where to write the ``solutions`` artifact.
        search: objective, constraints, number of diverse solutions, diversity, time limits.
        library: instead of scores and costs, a published block library JSON (layer -> variant ->
            stats/metrics).
        sweep: also solve for N values of one limit (``throughput>=1x:3x:9``): ``pareto.csv/png``.
        batch_size: solve at this measured batch size only (default: every one, keeping the best).
        force: re-run even when the output is up to date.
    """
    objective, num_solutions, diversity_alpha = search.objective, search.num_solutions, search.alpha
    time_limit, diverse_time_limit = search.time_limit_s, search.diverse_time_limit_s
    parsed = [Constraint.parse(c) for c in search.constraints]
    sweep_metric, sweep_texts = parse_sweep(sweep) if sweep else (None, [])
    if batch_size is not None and batch_size <= 0:
        raise SearchError(f"batch_size must be > 0, got {batch_size}")
    maximize = default_maximize(objective)
    inputs = {"library": library} if library else {"scores": scores or "", "costs": costs or ""}
    if not library and (not scores or not costs):
        raise SearchError("pass both scores and costs (artifacts or files), or library=FILE")
    parameters = {
        "objective": metric_key(objective),
        "maximize": maximize,
        "constraints": [c.text for c in parsed],
        "batch_size": batch_size,
        "num_solutions": num_solutions,
        "diversity_alpha": diversity_alpha,
        "sweep": sweep,
    }
    solved, every = _tables(scores, costs, library, objective, batch_size)
    if batch_size is None and not library:
        solved = [every[b] for b in solve_batches(every, parsed)]
    check_reachable(solved, parsed, maximize=maximize, others=every)

    def body(staging: Path, _inputs: dict[str, Path]) -> dict[str, Any]:
        started = time.perf_counter()
        table, first, per_batch = best_over_batches(
            solved, parsed, maximize=maximize, time_limit=time_limit, others=every
        )
        if num_solutions > 1:
            solutions = solve_table(
                table,
                parsed,
                maximize=maximize,
                num_solutions=num_solutions,
                alpha=diversity_alpha,
                time_limit=time_limit,
                diverse_time_limit=diverse_time_limit,
            )
        else:
            solutions = [first]
        payload: dict[str, Any] = {
            "objective": metric_key(objective),
            "maximize": maximize,
            "constraints": [c.text for c in parsed],
            "diversity_alpha": diversity_alpha,
            "source": {"library": library}
            if library
            else {"scores": scores, "costs": costs, "table": table.source},
            "batch_sizes": per_batch,
            "parent": describe(table, table.parent, parsed, every, method="parent"),
            "solutions": solutions,
        }
        if sweep_texts:
            rows = []
            for text in sweep_texts:
                point = Constraint.parse(text)
                try:
                    _, sol, _ = best_over_batches(
                        solved, [*parsed, point], maximize=maximize, time_limit=time_limit, others=every
                    )
                except InfeasibleConstraintError as exc:
                    log.info("sweep point %s is infeasible: %s", text, exc)
                    continue
                rows.append(
                    {
                        "sweep": text,
                        "objective": sol["objective"],
                        "status": sol["status"],
                        **sol["totals"],
                        "batch_size": sol["batch_size"],
                        "blocks": " ".join(sol["blocks"]),
                    }
                )
                payload.setdefault("sweep", []).append({"sweep": text, **sol})
            with (staging / PARETO_CSV).open("w", newline="") as fh:
                fields = [
                    "sweep",
                    "objective",
                    "status",
                    "throughput",
                    "latency_ms",
                    "memory_mib",
                    "params",
                    "batch_size",
                    "blocks",
                ]
                writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            _plot_pareto(rows, metric_key(objective), staging / PARETO_PNG)
            log.info("sweep over %s: %d of %d points feasible", sweep_metric, len(rows), len(sweep_texts))
        write_solutions(staging, payload)
        best = solutions[0]
        return {
            "objective": best["objective"],
            "status": best["status"],
            "batch_size": best["batch_size"],
            "throughput": best["totals"]["throughput"],
            "speedup": best["relative_to_parent"]["throughput"],
            "num_solutions": len(solutions),
            "seconds": time.perf_counter() - started,
        }

    return run_phase(SOLUTIONS_KIND, out, inputs, parameters, body, materialize_inputs=False, force=force)


def load_solutions(uri: str) -> dict[str, Any]:
    """The ``solutions.json`` of a solutions artifact (directory or file)."""
    path = uri if uri.endswith(".json") else storage.join(uri, SOLUTIONS_JSON)
    if not storage.exists(path):
        raise TableError(f"no {SOLUTIONS_JSON} at {uri}: run `puzzle search` (or a baseline) first")
    return json.loads(storage.read_bytes(path).decode("utf-8"))
