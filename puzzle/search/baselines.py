"""Baselines: simpler ways to pick an architecture, written as ``solutions`` like the search's.

The evaluation compares the Puzzle child against these at the same constraints (and the same
training budget), so each writes ``solutions.json`` in the search's format
(:func:`puzzle.search.mip.describe`), with ``method`` set:

* ``greedy``: from the parent, repeatedly make the single-layer change with the smallest score
  increase per unit of constraint violation removed, until every constraint holds (the paper's
  greedy ablation: no global view of the trade-off).
* ``noop_only``: the exact search restricted to a no-op-only space: each sub-block is either the
  parent's or a no-op (the paper's "no-op only" ablation).
* ``uniform_width``: the same block in every layer (any but the all-no-op one): among those
  meeting the constraints, the one with the best score (usually the widest that fits).
* ``layer_dropping``: drop whole layers (attention and FFN no-op) in order of block influence,
  BI = 1 - cos(input, output) of each layer of the parent on calibration tokens (Men et al.,
  ShortGPT), least influential first, until the constraints hold.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from puzzle.config import BaselinesConfig, GKDConfig, SearchConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts
from puzzle.io.artifacts import Manifest, run_phase
from puzzle.search.knapsack import greedy_repair
from puzzle.search.mip import (
    SOLUTIONS_KIND,
    Constraint,
    InfeasibleConstraintError,
    SearchError,
    constraint_report,
    describe,
    load_tables,
    make_problem,
    solve_batches,
    solve_table,
    write_solutions,
)
from puzzle.search.tables import (
    BlockTable,
    default_maximize,
    metric_key,
)

if TYPE_CHECKING:
    from puzzle.modeling import DeciLMForCausalLM

log = logging.getLogger(__name__)

METHODS = ("greedy", "noop_only", "uniform_width", "layer_dropping")
_ALIASES = {"uniform": "uniform_width", "layer_drop": "layer_dropping", "noop": "noop_only"}
DROPPED = "attn_noop+ffn_noop"


class BaselineError(PuzzleError, ValueError):
    """A baseline cannot be computed as asked; the message says why and what to do."""


# --------------------------------------------------------------------------- the methods


Tables = dict[int, BlockTable] | None
"""The tables of every measured batch size, for constraints pinned to one (``@bs<N>``)."""


def _feasible(table: BlockTable, constraints: list[Constraint], choice: list[int], others: Tables) -> bool:
    return all(c["satisfied"] for c in constraint_report(table, constraints, choice, others))


def greedy(
    table: BlockTable, constraints: list[Constraint], *, maximize: bool, others: Tables = None
) -> dict[str, Any]:
    problem = make_problem(table, constraints, maximize=maximize, others=others)
    choice = greedy_repair(problem, np.asarray(table.parent))
    if choice is None:
        raise InfeasibleConstraintError(
            f"greedy: no sequence of single-layer changes meets {[c.text for c in constraints]} at batch "
            "size "
            f"{table.batch_size}"
        )
    return describe(table, [int(c) for c in choice], constraints, others, method="greedy", status="feasible")


def noop_only(
    table: BlockTable,
    constraints: list[Constraint],
    *,
    maximize: bool,
    time_limit: float,
    others: Tables = None,
) -> dict[str, Any]:
    keep = np.zeros_like(table.valid)
    for layer, names in enumerate(table.names):
        pa, pf = table.names[layer][table.parent[layer]].split("+")
        for v, name in enumerate(names):
            attn, ffn = name.split("+")
            keep[layer, v] = attn in (pa, "attn_noop") and ffn in (pf, "ffn_noop")
    restricted = table.restrict(keep)
    solution = solve_table(restricted, constraints, maximize=maximize, time_limit=time_limit, others=others)[
        0
    ]
    solution["method"] = "noop_only"
    return solution


def uniform_width(
    table: BlockTable, constraints: list[Constraint], *, maximize: bool, others: Tables = None
) -> dict[str, Any]:
    """The same width in every layer: one GQA / FFN size (or linear) block everywhere. Skipping a
    sub-block is not a width, so blocks with a no-op side are not candidates: when no uniform width
    reaches the target the baseline says so instead of dropping attention everywhere."""
    common = set(table.names[0])
    for names in table.names[1:]:
        common &= set(names)
    widths = sorted(b for b in common if "noop" not in b)
    candidates = []
    for block in widths:
        choice = [table.index(layer, block) for layer in range(table.num_layers)]
        if _feasible(table, constraints, choice, others):
            candidates.append((block, choice))
    if not candidates:
        raise InfeasibleConstraintError(
            f"uniform_width: no single width used in every layer meets {[c.text for c in constraints]} "
            f"at batch size {table.batch_size} (uniform widths available: {widths})"
        )

    def key(item: tuple[str, list[int]]) -> tuple[float, float]:
        value = table.objective_value(item[1])
        params = table.totals(item[1])["params"]
        if value is None:
            return (math.inf, -params)
        return (-value if maximize else value, -params)

    block, choice = min(candidates, key=key)
    return describe(
        table, choice, constraints, others, method="uniform_width", status="feasible", uniform_block=block
    )


def layer_dropping(
    table: BlockTable, constraints: list[Constraint], influence: list[float], others: Tables = None
) -> dict[str, Any]:
    if len(influence) != table.num_layers:
        raise BaselineError(f"block influence has {len(influence)} layers, the table {table.num_layers}")
    choice = list(table.parent)
    dropped: list[int] = []
    for layer in np.argsort(influence, kind="stable"):
        if _feasible(table, constraints, choice, others):
            break
        choice[int(layer)] = table.index(int(layer), DROPPED)
        dropped.append(int(layer))
    if not _feasible(table, constraints, choice, others):
        raise InfeasibleConstraintError(
            f"layer_dropping: even with every layer dropped, {[c.text for c in constraints]} is not met at "
            "batch size "
            f"{table.batch_size}"
        )
    return describe(
        table,
        choice,
        constraints,
        others,
        method="layer_dropping",
        status="feasible",
        dropped_layers=sorted(dropped),
        block_influence=[float(x) for x in influence],
    )


# --------------------------------------------------------------------------- block influence


@torch.no_grad()
def block_influence(model: DeciLMForCausalLM, input_ids: torch.Tensor, *, batch_size: int = 8) -> list[float]:
    """Per layer, 1 - mean cosine similarity between the hidden state entering and leaving it."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def fn(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            captured[index] = (hidden_in.detach(), hidden_out.detach())

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        device = next(model.parameters()).device
        for start in range(0, len(input_ids), batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            model(input_ids=ids, use_cache=False)
            for i, (h_in, h_out) in captured.items():
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                sums[i] += (1.0 - cos).double().sum().cpu()
            count += ids.numel()
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).tolist()


def _input_uri(uri: str | None, name: str) -> str | None:
    """An input ``name`` recorded in the manifest of the artifact at ``uri`` (None if absent)."""
    if not uri:
        return None
    manifest = artifacts.read_manifest(uri)
    if manifest is None:
        return None
    ref = manifest.inputs.get(name)
    return ref.get("uri") if ref else None


def _resolve(child: str | None, tokens: str | None, scores: str, library: str | None) -> tuple[str, str]:
    """The parent and tokens: given, or the ones the scores (or library) were made from."""
    for source in (scores, library):
        child = child or _input_uri(source, "parent")
        tokens = tokens or _input_uri(source, "tokens")
    if not child or not tokens:
        raise BaselineError(
            "layer_dropping needs the parent (parent=...) and calibration tokens (tokens=...) to measure "
            "block "
            "influence; they could not be found in the scores' or library's manifest either"
        )
    return child, tokens


# --------------------------------------------------------------------------- the phase


def baseline(
    method: str,
    scores: str,
    costs: str,
    out: str,
    search: SearchConfig,
    *,
    parent: str | None = None,
    tokens: str | None = None,
    library: str | None = None,
    batch_size: int | None = None,
    split: str = "calibration",
    max_sequences: int = 32,
    device: str = "auto",
    force: bool = False,
) -> Manifest:
    """Write the ``method`` baseline's solution at ``out`` (a ``solutions`` artifact), at the
    search's objective and constraints.

    ``batch_size`` None: every batch size of the cost table, keeping the best-scoring result.
    ``layer_dropping`` measures block influence on ``max_sequences`` sequences of ``split`` of
    ``tokens`` with the ``parent``; both default to those the scores were computed from.
    """
    objective, constraints, time_limit = search.objective, search.constraints, search.time_limit_s
    child = parent
    method = _ALIASES.get(method, method)
    if method not in METHODS:
        raise BaselineError(f"unknown baseline {method!r}; use one of {', '.join(METHODS)}")
    parsed = [Constraint.parse(c) for c in constraints]
    if not parsed:
        raise SearchError(
            "a baseline needs at least one constraint (e.g. 'throughput>=1.5x'), or it is the parent"
        )
    maximize = default_maximize(objective)
    include = (DROPPED,) if method == "layer_dropping" else ()
    every = load_tables(scores, costs, objective, include=include)
    if batch_size is not None and batch_size not in every:
        raise SearchError(f"batch_size {batch_size} was not measured; the cost table has {sorted(every)}")
    tables = (
        [every[batch_size]] if batch_size is not None else [every[b] for b in solve_batches(every, parsed)]
    )
    inputs = {"scores": scores, "costs": costs}
    if method == "layer_dropping":
        child, tokens = _resolve(child, tokens, scores, library)
        inputs.update(parent=child, tokens=tokens)
    parameters = {
        "method": method,
        "objective": metric_key(objective),
        "maximize": maximize,
        "constraints": [c.text for c in parsed],
        "batch_size": batch_size,
        "split": split,
        "max_sequences": max_sequences,
    }

    def body(staging: Path, _local: dict[str, Path]) -> dict[str, Any]:
        started = time.perf_counter()
        influence: list[float] | None = None
        if method == "layer_dropping":
            from puzzle.data import load_split
            from puzzle.modeling.checkpoints import load_model
            from puzzle.modeling.devices import resolve_device

            if child is None or tokens is None:  # unreachable: _resolve() set both above
                raise BaselineError("layer_dropping needs the parent and calibration tokens")
            model = load_model(child, dtype="float32", device=resolve_device(device))
            ids = load_split(tokens, split)[:max_sequences]
            influence = block_influence(model, ids)
            del model
            log.info("block influence per layer: %s", ", ".join(f"{x:.3g}" for x in influence))
        results, errors = [], []
        for table in tables:
            try:
                if method == "greedy":
                    sol = greedy(table, parsed, maximize=maximize, others=every)
                elif method == "noop_only":
                    sol = noop_only(table, parsed, maximize=maximize, time_limit=time_limit, others=every)
                elif method == "uniform_width":
                    sol = uniform_width(table, parsed, maximize=maximize, others=every)
                else:
                    assert influence is not None
                    sol = layer_dropping(table, parsed, influence, others=every)
            except InfeasibleConstraintError as exc:
                errors.append(str(exc))
                continue
            results.append((table, sol))
        payload: dict[str, Any] = {
            "objective": metric_key(objective),
            "maximize": maximize,
            "method": method,
            "constraints": [c.text for c in parsed],
            "source": {"scores": scores, "costs": costs},
            "parent": describe(tables[0], tables[0].parent, parsed, every, method="parent"),
        }
        if not results:
            # Said, not degenerated: the report lists the baseline as unable to reach the target.
            reason = errors[0] if len(errors) == 1 else "\n".join(errors)
            log.warning("baseline %s cannot reach %s: %s", method, [c.text for c in parsed], reason)
            write_solutions(staging, {**payload, "unreachable": reason, "solutions": []})
            return {"method": method, "reachable": False}
        table, best = min(results, key=lambda item: _rank(item[1], maximize))
        best.update(rank=1, method=method, solve_seconds=time.perf_counter() - started)
        payload["batch_sizes"] = {
            str(t.batch_size): {"objective": s["objective"], "throughput": s["totals"]["throughput"]}
            for t, s in results
        }
        payload["parent"] = describe(table, table.parent, parsed, every, method="parent")
        write_solutions(staging, {**payload, "solutions": [best]})
        return {
            "method": method,
            "reachable": True,
            "objective": best["objective"],
            "batch_size": best["batch_size"],
            "throughput": best["totals"]["throughput"],
            "speedup": best["relative_to_parent"]["throughput"],
        }

    return run_phase(SOLUTIONS_KIND, out, inputs, parameters, body, materialize_inputs=False, force=force)


def _rank(solution: dict[str, Any], maximize: bool) -> tuple[float, float]:
    value = solution["objective"]
    speed = -solution["totals"]["throughput"]
    if value is None or not math.isfinite(value):
        return (math.inf, speed)
    return (-value if maximize else value, speed)


def baseline_child(
    method: str,
    library: str,
    scores: str,
    costs: str,
    parent: str,
    tokens: str,
    out: str,
    *,
    search: SearchConfig,
    gkd: GKDConfig,
    baselines: BaselinesConfig,
    work: str | None = None,
    device: str = "auto",
) -> Manifest:
    """Phase ``baselines`` (one method): the baseline's solution, its child realized from the library
    and, with ``baselines.gkd``, distilled with the Puzzle child's GKD settings; children are written
    in ``gkd.save_dtype``.

    The solution is written under ``work`` (default ``<out>-steps``: ``solutions/``), the final child
    at ``out`` (its ``parent.json`` names the method). With GKD, the realized child is a working file
    of ``out`` (under its staging ``.work/``, removed once ``out`` is published; with
    ``gkd.keep_steps`` under ``work`` as ``realized/``), and ``out`` is up to date for the same
    solution, library, parent, tokens and GKD settings whether it is still there or not. Each step
    resumes like any phase.
    """
    from puzzle.child.gkd import RUN_ONLY, distill
    from puzzle.child.realize import realize
    from puzzle.io import storage
    from puzzle.modeling.checkpoints import CHILD_KIND, MODEL_KINDS

    work = work or f"{out.rstrip('/')}-steps"
    solutions = storage.join(work, "solutions")
    found = baseline(
        method, scores, costs, solutions, search, parent=parent, tokens=tokens, library=library, device=device
    )
    if not found.summary.get("reachable", True):
        # No child to realize: the baseline's output is its solutions, which say why (the report
        # lists it as unable to reach the target rather than comparing a degenerate child).
        return artifacts.copy(solutions, out, SOLUTIONS_KIND)
    if not baselines.gkd:
        return realize(library, solutions, parent, out, dtype=gkd.save_dtype)

    def body(staging: Path, _local: dict[str, Path]) -> dict[str, Any]:
        steps = artifacts.steps_dir(out, staging, keep=gkd.keep_steps, work=work)
        realized = storage.join(steps, "realized")
        realize(library, solutions, parent, realized, dtype=gkd.save_dtype)
        distilled = distill(
            realized, parent, tokens, str(staging / ".work" / "distilled"), gkd, device=device
        )
        artifacts.adopt(str(staging / ".work" / "distilled"), staging)
        return dict(distilled.summary)

    return run_phase(
        CHILD_KIND,
        out,
        {"library": library, "solutions": solutions, "parent": parent, "tokens": tokens},
        {"gkd": {k: v for k, v in asdict(gkd).items() if k not in RUN_ONLY}},
        body,
        input_kinds={
            "library": "library",
            "solutions": SOLUTIONS_KIND,
            "parent": MODEL_KINDS,
            "tokens": "tokens",
        },
        materialize_inputs=False,  # realize and GKD read (and check) them
    )
