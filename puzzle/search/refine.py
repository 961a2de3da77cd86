"""The search stage as the paper runs it: exact pair scores, coupled BLD, speed met when measured.

:func:`search` starts from the decoupled scores (one row per variant with the parent's other
sub-block) and the measured cost table, and repeats, each step resumable:

1. **Solve** the MIP for the top ``search.num_solutions`` diverse solutions (:mod:`puzzle.search.mip`).
2. **Exact pairs** (``scoring.mode: hybrid``): every (attention, FFN) pair of those solutions that
   changes both sub-blocks of its layer is scored with the real pair in place (replace-1-block,
   :func:`puzzle.library.scoring.score` with explicit rows), replacing its additive estimate
   ``s(a+pf) + s(pa+f) - s(pa+pf)``; solve again until every pair of the answer was scored exactly.
   The estimate's error on each such pair is recorded (``pairs.csv``).
3. **Coupled BLD** (``bld.coupled: chosen``, once): the chosen pairs are trained together
   (:func:`puzzle.library.bld.train` with ``pairs``), written as an overlay of the library
   (``coupled/``, a partial library artifact), scored again and the search repeated.
4. **Measured speed**: the parent and every candidate are run whole on this device (random weights
   of their exact shapes, the cost table's loop and workload). When the best candidate misses a
   speed limit (with ``search.speed_margin`` of headroom), that limit is tightened by the
   measured/predicted ratio and the search repeats, at most ``search.max_corrections`` times; then
   the stage fails saying by how much.

The output (a ``solutions`` artifact) holds ``solutions.json`` (the candidates, best first, each
with its predicted and measured figures and whether it meets every target when measured),
``rounds.json`` (what each step did), ``pairs.csv`` and, with coupled BLD, ``coupled/``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from puzzle.config import BLDConfig, ScoringConfig, SearchConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts
from puzzle.io.artifacts import Manifest
from puzzle.search.costs import CostsConfig, CostTable, TorchBackend, check_same_hardware, load_costs
from puzzle.search.mip import (
    SOLUTIONS_JSON,
    SOLUTIONS_KIND,
    Constraint,
    InfeasibleConstraintError,
    best_over_batches,
    check_reachable,
    describe,
    solve_batches,
    solve_table,
    write_solutions,
)
from puzzle.search.tables import (
    BlockTable,
    ScoreTable,
    build_table,
    default_maximize,
    load_scores,
    split_block,
)

log = logging.getLogger(__name__)

ROUNDS_JSON = "rounds.json"
PAIRS_CSV = "pairs.csv"
COUPLED = "coupled"
SPEED_METRICS = ("throughput", "latency")


class SpeedTargetError(PuzzleError, RuntimeError):
    """The chosen child misses a speed limit when measured, after every allowed correction."""


@dataclasses.dataclass
class _State:
    """What the search has learned so far (kept across its rounds)."""

    scores: ScoreTable
    costs: CostTable
    exact: dict[tuple[int, str, str], dict[str, float]] = dataclasses.field(default_factory=dict)
    additive: dict[tuple[int, str, str], float] = dataclasses.field(default_factory=dict)
    coupled: set[tuple[int, str]] = dataclasses.field(default_factory=set)
    rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _changed_pairs(table: BlockTable, solution: dict[str, Any]) -> list[tuple[int, str, str]]:
    """(layer, attention, ffn) of every layer where both sub-blocks differ from the parent's."""
    out = []
    for layer, block in enumerate(solution["blocks"]):
        attn, ffn = split_block(block)
        pa, pf = split_block(table.names[layer][table.parent[layer]])
        if attn != pa and ffn != pf:
            out.append((layer, attn, ffn))
    return out


def _tables(state: _State, objective: str) -> dict[int, BlockTable]:
    return {
        b: build_table(state.scores, state.costs, objective=objective, batch_size=b)
        for b in state.costs.batch_sizes
    }


def _solve(
    state: _State, constraints: list[Constraint], search: SearchConfig
) -> tuple[BlockTable, list[dict[str, Any]], dict[int, BlockTable]]:
    maximize = default_maximize(search.objective)
    every = _tables(state, search.objective)
    solved = [every[b] for b in solve_batches(every, constraints)]
    check_reachable(solved, constraints, maximize=maximize, others=every)
    table, first, _ = best_over_batches(
        solved, constraints, maximize=maximize, time_limit=search.time_limit_s, others=every
    )
    solutions = [first]
    if search.num_solutions > 1:
        solutions = solve_table(
            table,
            constraints,
            maximize=maximize,
            num_solutions=search.num_solutions,
            alpha=search.alpha,
            time_limit=search.time_limit_s,
            diverse_time_limit=search.diverse_time_limit_s,
            others=every,
        )
    return table, solutions, every


def _add_rows(state: _State, scores_uri: str, objective: str, *, coupled: bool) -> int:
    """Put a scores artifact's rows into the table as exact; returns how many."""
    from puzzle.library.scoring import read_scores

    rows = read_scores(scores_uri)["rows"]
    metric_names = [m for m in state.scores.metrics]
    for row in rows:
        key = (int(row["layer"]), str(row["attention"]), str(row["ffn"]))
        values = {m: float(row[m]) for m in metric_names if row.get(m) not in (None, "")}
        if key not in state.additive and key not in state.exact:
            estimate = state.scores.score(*key, objective)
            if estimate is not None:
                state.additive[key] = estimate
        state.scores.values[key] = values
        state.exact[key] = values
        if coupled:
            state.coupled.add((key[0], f"{key[1]}+{key[2]}"))
    return len(rows)


def search(
    scores: str,
    costs: str,
    library: str,
    parent: str,
    tokens: str,
    out: str,
    search: SearchConfig,
    scoring: ScoringConfig,
    bld: BLDConfig,
    *,
    device: str = "auto",
) -> Manifest:
    """Phase ``search``: candidate children whose every pair was scored exactly (``hybrid``), with
    coupled BLD on the chosen pairs (``bld.coupled: chosen``) and their speed met when measured."""
    parsed = [Constraint.parse(c) for c in search.constraints]
    maximize = default_maximize(search.objective)
    cost_table = load_costs(costs)
    score_table = load_scores(scores, cost_table.parent_blocks or None)
    missing = sorted({c.batch_size for c in parsed if c.batch_size is not None} - set(cost_table.batch_sizes))
    if missing:
        raise InfeasibleConstraintError(
            f"search.constraints name batch sizes {missing} the cost table was not measured at "
            f"({cost_table.batch_sizes}): add them to costs.batch_sizes"
        )
    every = {
        b: build_table(score_table, cost_table, objective=search.objective, batch_size=b)
        for b in cost_table.batch_sizes
    }
    check_reachable([every[b] for b in solve_batches(every, parsed)], parsed, maximize=maximize, others=every)
    inputs = {"scores": scores, "costs": costs, "library": library, "parent": parent, "tokens": tokens}
    parameters = {
        "search": dataclasses.asdict(search),
        "scoring": dataclasses.asdict(scoring),
        "bld": dataclasses.asdict(bld) if bld.coupled == "chosen" else {"coupled": "none"},
    }

    margin = search.speed_margin
    if margin is None:
        from puzzle.modeling.devices import resolve_device

        margin = 0.08 if resolve_device(device).type == "cpu" else 0.02

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        started = time.perf_counter()
        work = staging / ".work"
        work.mkdir(parents=True, exist_ok=True)
        state = _State(load_scores(scores, cost_table.parent_blocks or None), cost_table)
        for key, values in state.scores.values.items():  # pairs scored as such already (mode full)
            pa, pf = state.scores.parent[key[0]]
            if key[1] != pa and key[2] != pf:
                state.exact[key] = values
        corrections: dict[str, float] = {}
        overlay: str | None = None
        measured_parent: dict[int, dict[str, Any]] | None = None
        for step in range(search.max_rounds + search.max_corrections + 2):
            constraints = [_tightened(c, corrections.get(c.text, 1.0)) for c in parsed]
            table, solutions, every_now = _solve(state, constraints, search)
            round_info: dict[str, Any] = {"step": step, "constraints": [c.text for c in constraints]}
            needed = sorted(
                {p for sol in solutions for p in _changed_pairs(table, sol) if p not in state.exact}
            )
            if scoring.mode == "hybrid" and needed:
                if sum(1 for r in state.rounds if r.get("scored_pairs")) >= search.max_rounds:
                    raise InfeasibleConstraintError(
                        f"hybrid scoring did not settle in search.max_rounds={search.max_rounds} rounds: "
                        "raise it or use scoring.mode: full"
                    )
                from puzzle.library.scoring import score

                rows = [(layer, f"{a}+{f}") for layer, a, f in needed]
                target = str(work / f"pairs-{step}")
                score(library, parent, tokens, target, scoring, rows=rows, overlay=overlay, device=device)
                round_info["scored_pairs"] = _add_rows(state, target, search.objective, coupled=False)
                state.rounds.append(round_info)
                log.info("search step %d: scored %d pairs exactly; solving again", step, len(needed))
                continue
            if bld.coupled == "chosen" and overlay is None:
                # A pair of two no-ops has no weights to train.
                chosen = sorted(
                    {
                        p
                        for sol in solutions
                        for p in _changed_pairs(table, sol)
                        if (p[1], p[2]) != ("attn_noop", "ffn_noop")
                    }
                )
                if chosen:
                    overlay = _train_coupled(library, parent, tokens, work, bld, chosen, device)
                    from puzzle.library.scoring import score

                    target = str(work / "coupled-scores")
                    rows = [(layer, f"{a}+{f}") for layer, a, f in chosen]
                    score(library, parent, tokens, target, scoring, rows=rows, overlay=overlay, device=device)
                    round_info["coupled_pairs"] = _add_rows(state, target, search.objective, coupled=True)
                    state.rounds.append(round_info)
                    log.info(
                        "search step %d: trained and scored %d coupled pairs; solving again",
                        step,
                        len(chosen),
                    )
                    continue
                overlay = ""  # nothing to couple: no pair changes both sub-blocks
            if measured_parent is None:
                measured_parent = _measure(cost_table, cost_table.parent_blocks, parsed, table, device)
            for sol in solutions:
                sol["measured"] = _measure(cost_table, sol["blocks"], parsed, table, device)
                sol["measured_checks"] = _checks(sol, parsed, measured_parent, every_now, margin)
                sol["meets_targets"] = all(c["satisfied"] for c in sol["measured_checks"])
            best = solutions[0]
            round_info["measured"] = [
                {c["constraint"]: c["value"] for c in s["measured_checks"]} for s in solutions
            ]
            if best["meets_targets"]:
                state.rounds.append(round_info)
                break
            misses = [c for c in best["measured_checks"] if not c["satisfied"]]
            if sum(1 for r in state.rounds if r.get("corrected")) >= search.max_corrections:
                detail = "; ".join(
                    f"{c['constraint']}: measured {c['value']:.4g} vs bound {c['bound']:.4g} "
                    f"({100 * c['shortfall']:.1f} % short)"
                    for c in misses
                )
                raise SpeedTargetError(
                    f"the best child misses its speed targets when measured after {search.max_corrections} "
                    f"corrections: {detail}; relax search.constraints, raise search.max_corrections, or give "
                    "the library cheaper variants"
                )
            for c in misses:
                corrections[c["constraint_text"]] = corrections.get(c["constraint_text"], 1.0) * c["ratio"]
            round_info["corrected"] = {
                c["constraint_text"]: corrections[c["constraint_text"]] for c in misses
            }
            state.rounds.append(round_info)
            log.info(
                "search step %d: measured speed misses %s; tightening and solving again",
                step,
                round_info["corrected"],
            )
        else:
            raise InfeasibleConstraintError("the search did not settle: raise search.max_rounds")
        for rank, sol in enumerate(solutions, start=1):
            sol["rank"] = rank
            sol["exact_pairs"] = all(p in state.exact for p in _changed_pairs(table, sol))
            sol["coupled_blocks"] = [
                [layer, block] for layer, block in enumerate(sol["blocks"]) if (layer, block) in state.coupled
            ]
        payload: dict[str, Any] = {
            "objective": search.objective,
            "maximize": maximize,
            "constraints": [c.text for c in parsed],
            "corrections": corrections,
            "scoring_mode": scoring.mode,
            "speed_margin": margin,
            "source": {"scores": scores, "costs": costs, "library": library, "table": table.source},
            "parent": {
                **describe(table, table.parent, parsed, every_now, method="parent"),
                "measured": measured_parent,
            },
            "coupled": COUPLED if overlay else None,
            "solutions": solutions,
        }
        if overlay:
            import shutil

            shutil.copytree(overlay, staging / COUPLED)
        write_solutions(staging, payload)
        (staging / ROUNDS_JSON).write_text(json.dumps(state.rounds, indent=2, default=float) + "\n")
        pairs = _write_pairs(staging / PAIRS_CSV, state, search.objective)
        best = solutions[0]
        return {
            "objective": best["objective"],
            "status": best["status"],
            "batch_size": best["batch_size"],
            "candidates": len(solutions),
            "predicted_speedup": best["relative_to_parent"]["throughput"],
            "measured_speedup": _speedup(best, measured_parent, best["batch_size"]),
            "exact_pairs": len(state.exact),
            "coupled_pairs": len(state.coupled),
            "corrections": len(corrections),
            "additive_error_median_pct": pairs.get("median_abs_error_pct"),
            "seconds": time.perf_counter() - started,
        }

    return artifacts.run_phase(SOLUTIONS_KIND, out, inputs, parameters, body, materialize_inputs=False)


def _tightened(c: Constraint, factor: float) -> Constraint:
    """``c`` with its speed bound made ``factor`` times stricter."""
    if factor == 1.0:
        return c
    value = c.value * factor if c.metric == "throughput" else c.value / factor
    return dataclasses.replace(c, value=value, text=f"{c.text} (tightened x{factor:.4g})")


def _train_coupled(
    library: str,
    parent: str,
    tokens: str,
    work: Path,
    bld: BLDConfig,
    chosen: list[tuple[int, str, str]],
    device: str,
) -> str:
    from puzzle.library.bld import train

    target = str(work / COUPLED)
    pairs = [(layer, f"{a}+{f}") for layer, a, f in chosen]
    train(library, parent, tokens, target, bld, pairs=pairs, device=device)
    return target


def _measure(
    costs: CostTable, blocks: list[str], constraints: list[Constraint], table: BlockTable, device: str
) -> dict[int, dict[str, Any]]:
    """Whole-model speed of ``blocks`` (random weights of their shapes) at every batch size a speed
    constraint needs, in the cost table's loop, workload and dtype."""
    from puzzle.modeling import BlockConfig
    from puzzle.modeling.checkpoints import child_config_like

    sizes = sorted({c.batch_size or table.batch_size for c in constraints if c.metric in SPEED_METRICS})
    if not sizes:
        return {}
    repeats = max(3, int(costs.data.get("measurement", {}).get("repeats") or 3))
    meter = TorchBackend(device=device, dtype=costs.hardware["dtype"], repeats=repeats)
    check_same_hardware(costs, meter.hardware(), what="the cost table and this machine")
    config = child_config_like(costs.config(), [BlockConfig.from_name(b) for b in blocks])
    workload = CostsConfig(batch_sizes=sizes, prompt_len=costs.prompt_len, gen_len=costs.gen_len)
    measured = meter.measure_model(config, workload)
    return {
        b: {"throughput": float(m["throughput"]), "latency": float(m["total_s"]) * 1e3}
        for b, m in measured.items()
    }


def _speedup(solution: dict[str, Any], parent: dict[int, dict[str, Any]] | None, batch: int) -> float | None:
    child = (solution.get("measured") or {}).get(batch)
    if not parent or child is None or batch not in parent:
        return None
    return child["throughput"] / parent[batch]["throughput"]


def _checks(
    solution: dict[str, Any],
    constraints: list[Constraint],
    parent: dict[int, dict[str, Any]],
    every: dict[int, BlockTable],
    margin: float,
) -> list[dict[str, Any]]:
    """Each speed constraint against the whole-model measurement (relative ones against the parent's
    measurement): the measured value, the bound with headroom, the ratio to tighten by if short."""
    out = []
    for c in constraints:
        if c.metric not in SPEED_METRICS:
            continue
        batch = c.batch_size or solution["batch_size"]
        measured = solution["measured"][batch][c.metric]
        reference = parent[batch][c.metric]
        table = every[batch]
        predicted = table.totals([table.index(layer, b) for layer, b in enumerate(solution["blocks"])])[
            c.metric
        ]
        predicted_parent = table.totals(table.parent)[c.metric]
        if c.metric == "throughput":
            value = measured / reference if c.relative else measured
            bound = c.value * (1 + margin) if c.relative else c.value * (1 + margin)
            ok = value >= bound
            shortfall = max(0.0, 1 - value / bound)
            predicted_value = predicted / predicted_parent if c.relative else predicted
            ratio = predicted_value / value if value > 0 else 2.0
        else:
            value = measured / reference if c.relative else measured
            bound = c.value * (1 - margin)
            ok = value <= bound
            shortfall = max(0.0, value / bound - 1)
            predicted_value = predicted / predicted_parent if c.relative else predicted
            ratio = value / predicted_value if predicted_value > 0 else 2.0
        out.append(
            {
                "constraint": c.text,
                "constraint_text": c.text.split(" (tightened")[0],
                "batch_size": batch,
                "value": value,
                "bound": bound,
                "predicted": predicted_value,
                "satisfied": bool(ok),
                "shortfall": shortfall,
                "ratio": max(1.0 + margin, ratio) if not ok else 1.0,
            }
        )
    return out


def _write_pairs(path: Path, state: _State, objective: str) -> dict[str, Any]:
    """The pairs scored exactly: the additive estimate next to the exact score."""
    rows: list[dict[str, Any]] = []
    for key, values in sorted(state.exact.items()):
        exact = values.get(objective)
        estimate = state.additive.get(key)
        error: float | None = None
        if estimate is not None and exact is not None and exact != 0.0 and math.isfinite(exact):
            error = 100.0 * (estimate - exact) / abs(exact)
        rows.append(
            {
                "layer": key[0],
                "attention": key[1],
                "ffn": key[2],
                "coupled": (key[0], f"{key[1]}+{key[2]}") in state.coupled,
                f"additive_{objective}": estimate,
                f"exact_{objective}": exact,
                "error_pct": error,
            }
        )
    with path.open("w", newline="") as fh:
        fields = [
            "layer",
            "attention",
            "ffn",
            "coupled",
            f"additive_{objective}",
            f"exact_{objective}",
            "error_pct",
        ]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    errors: list[float] = sorted(
        abs(float(r["error_pct"])) for r in rows if r["error_pct"] is not None and not r["coupled"]
    )
    return {"median_abs_error_pct": errors[len(errors) // 2] if errors else None, "pairs": len(rows)}


def read_candidates(uri: str) -> dict[str, Any]:
    """``solutions.json`` of a search stage's output."""
    from puzzle.io import storage

    artifacts.require_manifest(uri, SOLUTIONS_KIND)
    return json.loads(storage.read_bytes(storage.join(uri, SOLUTIONS_JSON)).decode())
