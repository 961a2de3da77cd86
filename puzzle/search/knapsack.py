"""Exact solver for the grouped (multiple-choice) knapsack behind Puzzle's architecture search.

Choose exactly one option per layer to minimise the summed score subject to linear ``<=`` rows
(runtime, memory, parameters, diversity overlaps). python-mip (CBC) is the solver of record,
but CBC alone is slow to *prove* optimality on real libraries: the LP bound is within a few
hundredths of a percent of the optimum and very many architectures sit inside that gap (the
published 80 x 16 Llama-3.3-70B library takes CBC 11 s at gap 0). So the model handed to CBC is
first shrunk by exact reductions, none of which can remove an optimal architecture:

1. **Lagrangian bound.** The LP relaxation (solved by CBC) gives dual prices ``lam >= 0`` for the
   rows; for any ``lam``, ``L(lam) = sum_l min_v (s + lam.a)_lv - lam.b`` is a lower bound, and
   an architecture's objective is at least ``L(lam) + sum_l red_l`` where ``red_lv`` is the
   option's reduced cost ``(s + lam.a)_lv - min_v (s + lam.a)_lv``.
2. **Incumbent.** A greedy repair of the LP solution followed by 1- and 2-swap local search
   gives a feasible architecture with objective ``UB``; CBC gets it as its start.
3. **Reduced-cost fixing.** Options with ``L + red > UB`` cannot be in a better architecture.
4. **Aggregation (dynamic programming).** Layers are merged pairwise into groups whose options
   are combinations of their layers' options; combinations that break a row even with the
   cheapest choice elsewhere, whose bound exceeds ``UB``, or that are dominated (no better score
   and no smaller use of any row than another combination of the same group) are dropped. This
   is the exact DP over Pareto fronts, stopped when few groups remain.

When the merging ends in a single group (the usual case: a few hundred surviving combinations
for the 80 x 16 library), the best feasible combination in it is the proven optimum. CBC then
solves the aggregated model (one binary per surviving combination) with that optimum as its
start, and its answer is checked against the DP's: CBC at gap 0 is not exact on these problems
(on the 80 x 16 library it reported sub-optimal answers as "optimal" in about one case in ten,
off by 2e-5 to 2e-3), so the DP's optimum wins a disagreement and the result says which one
proved it. When the merging must stop early (a group would exceed ``max_group_size``), CBC's
answer on the partly aggregated model is the result.

python-mip calls run with the garbage collector paused: collecting an old ``mip.Model`` while
cffi builds a lazy accessor deadlocks the process (``Model.__del__`` re-enters cffi's lock).

The backend (:func:`mip_solver`) is CBC when its library loads, else python-mip's HiGHS backend
(the ``highsbox`` package: 10 MB, where ``cbcbox`` is 190 MB); ``PUZZLE_MIP_SOLVER=cbc|highs``
forces one. Both answer the same problems (the DP proves the optimum either way); "CBC" below
means whichever backend was chosen.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from puzzle.errors import PuzzleError

log = logging.getLogger(__name__)
# python-mip logs every warm start at INFO ("Adding default start values ..."): keep it quiet.
logging.getLogger("mip").setLevel(logging.WARNING)

_REL_TOL = 1e-9

SOLVER_ENV = "PUZZLE_MIP_SOLVER"
"""Environment variable choosing python-mip's backend: ``auto`` (the default: CBC when its library
loads, else HiGHS), ``cbc`` or ``highs``."""
SOLVER_CHOICES = ("auto", "cbc", "highs")
# backend -> (python-mip's module, its availability flag, the package that ships the library)
_BACKENDS = {"cbc": ("mip.cbc", "has_cbc", "cbcbox"), "highs": ("mip.highs", "has_highs", "highsbox")}
_fallback_logged = False


class SolverUnavailableError(PuzzleError, RuntimeError):
    """No python-mip backend can be loaded (or ``PUZZLE_MIP_SOLVER`` names one that cannot)."""


def backend_available(name: str) -> bool:
    """Whether python-mip's backend ``name`` (``cbc`` or ``highs``) loads its solver library here."""
    module, flag, _ = _BACKENDS[name]
    quiet = logging.getLogger("mip")  # python-mip logs an ERROR when a backend's library is missing
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return bool(getattr(importlib.import_module(module), flag, False))
    except Exception:  # noqa: BLE001 - any failure to load the backend means it is not available
        return False
    finally:
        quiet.setLevel(level)


def mip_solver() -> str:
    """python-mip's ``solver_name`` for every model of the search: ``$PUZZLE_MIP_SOLVER`` (``cbc``
    or ``highs``), or with ``auto`` (the default) CBC, the solver of record, when its library loads,
    else HiGHS (e.g. where ``cbcbox`` cannot be installed); a clear error when neither loads."""
    global _fallback_logged
    raw = os.environ.get(SOLVER_ENV, "")
    choice = raw.strip().lower() or "auto"
    if choice not in SOLVER_CHOICES:
        raise SolverUnavailableError(f"{SOLVER_ENV}={raw!r} must be one of {', '.join(SOLVER_CHOICES)}")
    try:
        import mip
    except ImportError as exc:
        raise SolverUnavailableError(
            f"python-mip is not installed ({exc}): pip install mip==2.0.0 (it brings CBC through cbcbox; "
            "or add highsbox and set PUZZLE_MIP_SOLVER=highs where cbcbox cannot be installed)"
        ) from None
    for name in ("cbc", "highs") if choice == "auto" else (choice,):
        if backend_available(name):
            if choice == "auto" and name == "highs" and not _fallback_logged:
                log.info("knapsack: CBC (cbcbox) is not available here; solving with HiGHS (highsbox)")
                _fallback_logged = True
            return str(mip.CBC if name == "cbc" else mip.HIGHS)
    tried = ["cbc", "highs"] if choice == "auto" else [choice]
    packages = " or ".join(_BACKENDS[name][2] for name in tried)
    where = f" ({SOLVER_ENV}={raw})" if choice != "auto" else ""
    raise SolverUnavailableError(
        f"no MIP solver{where}: python-mip could not load {' nor '.join(n.upper() for n in tried)}; "
        f"install {packages} (pip install {packages.replace(' or ', ' / ')})"
        + ("" if choice == "auto" else f", or unset {SOLVER_ENV} to use whichever loads")
    )


class InfeasibleError(PuzzleError, ValueError):
    """No choice of one option per layer satisfies the rows; ``row`` is the culprit when one alone is."""

    def __init__(self, message: str, *, row: int | None = None, best: float | None = None) -> None:
        super().__init__(message)
        self.row = row
        self.best = best


@dataclass
class Problem:
    """Minimise ``sum_l score[l, choice_l]`` s.t. ``sum_l coef[k, l, choice_l] <= limit[k]`` for all k.

    ``valid[l, v]`` says whether option v exists in layer l (layers may have fewer options).
    """

    score: np.ndarray  # [L, V]
    coef: np.ndarray  # [K, L, V]
    limit: np.ndarray  # [K]
    valid: np.ndarray  # [L, V] bool
    row_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.score = np.asarray(self.score, dtype=np.float64)
        self.valid = np.asarray(self.valid, dtype=bool)
        self.coef = np.asarray(self.coef, dtype=np.float64).reshape(-1, *self.score.shape)
        self.limit = np.asarray(self.limit, dtype=np.float64).reshape(-1)
        if self.coef.shape[0] != self.limit.shape[0]:
            raise ValueError(f"{self.coef.shape[0]} constraint rows but {self.limit.shape[0]} limits")
        if not self.valid.any(axis=1).all():
            empty = [int(i) for i in np.flatnonzero(~self.valid.any(axis=1))]
            raise ValueError(f"layers {empty} have no option")
        # Invalid options never get chosen; keep their numbers finite so arithmetic stays clean.
        self.score = np.where(self.valid, self.score, 0.0)
        self.coef = np.where(self.valid[None], self.coef, 0.0)
        if not self.row_names:
            self.row_names = [f"row{k}" for k in range(self.num_rows)]

    @property
    def num_layers(self) -> int:
        return self.score.shape[0]

    @property
    def num_rows(self) -> int:
        return self.coef.shape[0]

    def totals(self, choice: Sequence[int] | np.ndarray) -> tuple[float, np.ndarray]:
        """Objective and row totals of one architecture."""
        idx = np.asarray(choice)
        layers = np.arange(self.num_layers)
        return float(self.score[layers, idx].sum()), self.coef[:, layers, idx].sum(axis=1)

    def is_feasible(self, choice: Sequence[int] | np.ndarray) -> bool:
        _, used = self.totals(choice)
        return bool(np.all(used <= self.limit + _tol(self.limit)))

    def row_minimum(self) -> np.ndarray:
        """The smallest total each row can reach on its own (cheapest option in every layer)."""
        big = np.where(self.valid[None], self.coef, np.inf)
        return big.min(axis=2).sum(axis=1)


@dataclass
class Result:
    choice: list[int]
    objective: float
    status: str  # "optimal" | "feasible"
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


def _tol(value: np.ndarray | float) -> np.ndarray | float:
    return _REL_TOL * np.maximum(1.0, np.abs(value))


@contextlib.contextmanager
def mip_session() -> Iterator[None]:
    """Run python-mip calls safely and quietly.

    The garbage collector is paused (collecting an old ``mip.Model`` inside cffi's lazy accessor
    set-up deadlocks), and CBC's own prints, which go to the C-level stdout even with
    ``verbose = 0``, are discarded.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    saved = devnull = None
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
    except (OSError, ValueError):  # no real stdout (e.g. some notebook kernels): keep it
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        if devnull is not None:
            os.close(devnull)
        if was_enabled:
            gc.enable()


# --------------------------------------------------------------------------- LP relaxation


def _lp_duals(problem: Problem) -> tuple[np.ndarray, float] | None:
    """Dual prices (>= 0) of the rows from the LP relaxation (CBC or HiGHS), and the LP bound; None if
    infeasible."""
    solver = mip_solver()
    import mip

    with mip_session():
        return _lp_duals_unguarded(problem, mip, solver)


def _lp_duals_unguarded(problem: Problem, mip: Any, solver: str) -> tuple[np.ndarray, float] | None:
    model = mip.Model(sense=mip.MINIMIZE, solver_name=solver)
    model.verbose = 0
    cells = np.argwhere(problem.valid)
    xs = [model.add_var(lb=0.0, ub=1.0) for _ in range(len(cells))]
    by_layer: list[list[Any]] = [[] for _ in range(problem.num_layers)]
    for var, (layer, _) in zip(xs, cells):
        by_layer[layer].append(var)
    for vars_ in by_layer:
        model.add_constr(mip.xsum(vars_) == 1)
    rows = []
    for k in range(problem.num_rows):
        coefs = problem.coef[k][problem.valid]
        rows.append(
            model.add_constr(
                mip.xsum(float(c) * v for c, v in zip(coefs, xs) if c != 0.0) <= float(problem.limit[k])
            )
        )
    model.objective = mip.xsum(float(c) * v for c, v in zip(problem.score[problem.valid], xs))
    status = model.optimize(relax=True)
    if status == mip.OptimizationStatus.INFEASIBLE:
        return None
    if status != mip.OptimizationStatus.OPTIMAL:
        log.warning("LP relaxation ended with status %s; continuing without dual prices", status.name)
        return np.zeros(problem.num_rows), -math.inf
    lam = np.array([max(0.0, -(row.pi or 0.0)) for row in rows])
    return lam, float(model.objective_value)


def lagrangian(problem: Problem, lam: np.ndarray) -> tuple[float, np.ndarray]:
    """The Lagrangian bound ``L(lam)`` and every option's reduced cost (>= 0; inf when invalid)."""
    priced = problem.score + np.tensordot(lam, problem.coef, axes=1)
    priced = np.where(problem.valid, priced, np.inf)
    best = priced.min(axis=1)
    return float(best.sum() - lam @ problem.limit), priced - best[:, None]


# --------------------------------------------------------------------------- incumbent


def heuristic(
    problem: Problem, start: np.ndarray, reduced: np.ndarray | None = None, *, max_rounds: int = 500
) -> np.ndarray | None:
    """A feasible architecture near ``start``: greedy repair, then 1- and 2-swap improvement."""
    choice = greedy_repair(problem, start)
    return None if choice is None else local_search(problem, choice, reduced, max_rounds=max_rounds)


def greedy_repair(problem: Problem, start: Sequence[int] | np.ndarray) -> np.ndarray | None:
    """From ``start``, repeatedly take the single-layer change with the smallest score increase per
    unit of constraint violation it removes, until every row holds (None if it gets stuck)."""
    L = problem.num_layers
    layers = np.arange(L)
    choice = np.asarray(start, dtype=np.int64).copy()
    score = np.where(problem.valid, problem.score, np.inf)
    limit = problem.limit
    tol = _tol(limit)
    spread = (
        np.where(problem.valid[None], problem.coef, -np.inf).max(axis=2)
        - np.where(problem.valid[None], problem.coef, np.inf).min(axis=2)
    ).sum(axis=1)
    scale = np.maximum(np.maximum(np.abs(limit), spread), 1e-12)

    def used_of(c: np.ndarray) -> np.ndarray:
        return problem.coef[:, layers, c].sum(axis=1)

    used = used_of(choice)
    for _ in range(L * problem.score.shape[1]):
        over = np.maximum(0.0, used - limit - tol) / scale
        if not over.any():
            break
        cur_coef = problem.coef[:, layers, choice]  # [K, L]
        new_used = used[:, None, None] + problem.coef - cur_coef[:, :, None]  # [K, L, V]
        new_over = (np.maximum(0.0, new_used - (limit + tol)[:, None, None]) / scale[:, None, None]).sum(
            axis=0
        )
        gain = over.sum() - new_over
        d_score = score - score[layers, choice][:, None]
        ok = problem.valid & (gain > 1e-15)
        if not ok.any():
            return None
        # Cheapest score increase per unit of violation removed (a score decrease is best of all).
        key = np.where(ok, d_score / np.where(ok, gain, 1.0), np.inf)
        flat = int(np.argmin(key))
        layer, option = divmod(flat, problem.score.shape[1])
        choice[layer] = option
        used = used_of(choice)
    if np.any(used > limit + tol):
        return None
    return choice


def local_search(
    problem: Problem, choice: np.ndarray, reduced: np.ndarray | None = None, *, max_rounds: int = 500
) -> np.ndarray:
    """Improve a feasible architecture by the best single-layer and two-layer changes that keep it
    feasible, until none helps."""
    L = problem.num_layers
    layers = np.arange(L)
    choice = choice.copy()
    score = np.where(problem.valid, problem.score, np.inf)
    limit = problem.limit
    tol = _tol(limit)

    def used_of(c: np.ndarray) -> np.ndarray:
        return problem.coef[:, layers, c].sum(axis=1)

    used = used_of(choice)
    # Candidate moves for the 2-swap step: the options with the smallest reduced costs.
    if reduced is None:
        reduced = np.where(problem.valid, 0.0, np.inf)
    finite = np.isfinite(reduced)
    order = np.argsort(np.where(finite, reduced, np.inf), axis=None)
    cand = order[: min(400, int(finite.sum()))]
    cand_l, cand_v = np.divmod(cand, problem.score.shape[1])
    for _ in range(max_rounds):
        cur_score = score[layers, choice]
        cur_coef = problem.coef[:, layers, choice]
        slack = limit + tol - used
        d_score = score - cur_score[:, None]
        d_coef = problem.coef - cur_coef[:, :, None]
        ok = problem.valid & np.all(d_coef <= slack[:, None, None], axis=0) & (d_score < -1e-15)
        if ok.any():
            flat = int(np.argmin(np.where(ok, d_score, np.inf)))
            layer, option = divmod(flat, problem.score.shape[1])
            choice[layer] = option
            used = used_of(choice)
            continue
        ds = d_score[cand_l, cand_v]
        dc = d_coef[:, cand_l, cand_v]
        pair_s = ds[:, None] + ds[None, :]
        pair_ok = (cand_l[:, None] != cand_l[None, :]) & (pair_s < -1e-15)
        for k in range(problem.num_rows):
            pair_ok &= (dc[k][:, None] + dc[k][None, :]) <= slack[k]
        if not pair_ok.any():
            break
        flat = int(np.argmin(np.where(pair_ok, pair_s, np.inf)))
        i, j = divmod(flat, len(cand))
        choice[cand_l[i]] = cand_v[i]
        choice[cand_l[j]] = cand_v[j]
        used = used_of(choice)
    return choice


# --------------------------------------------------------------------------- aggregation (DP)


@dataclass
class _Group:
    layers: list[int]
    score: np.ndarray  # [n]
    use: np.ndarray  # [K, n]
    red: np.ndarray  # [n]
    choice: np.ndarray  # [n, len(layers)]

    def __len__(self) -> int:
        return len(self.score)

    def take(self, mask: np.ndarray) -> _Group:
        return _Group(self.layers, self.score[mask], self.use[:, mask], self.red[mask], self.choice[mask])


def _merge(a: _Group, b: _Group) -> _Group:
    na, nb = len(a), len(b)
    return _Group(
        a.layers + b.layers,
        (a.score[:, None] + b.score[None, :]).ravel(),
        (a.use[:, :, None] + b.use[:, None, :]).reshape(a.use.shape[0], na * nb),
        (a.red[:, None] + b.red[None, :]).ravel(),
        np.concatenate([np.repeat(a.choice, nb, axis=0), np.tile(b.choice, (na, 1))], axis=1),
    )


def _pareto_2d(score: np.ndarray, use: np.ndarray, part: np.ndarray | None) -> np.ndarray:
    """Within each partition (equal columns of ``part``), keep the (use, score) staircase."""
    keys = [score, use] if part is None else [score, use, *part[::-1]]
    order = np.lexsort(keys)
    s = score[order]
    shifted = np.concatenate([[np.inf], s[:-1]])
    if part is None:
        best_before = np.minimum.accumulate(shifted)
    else:
        p = part[:, order]
        boundary = np.ones(len(order), dtype=bool)
        boundary[1:] = np.any(p[:, 1:] != p[:, :-1], axis=0)
        shifted[boundary] = np.inf
        best_before = _segmented_cummin(shifted, np.cumsum(boundary))
    keep = np.zeros(len(score), dtype=bool)
    keep[order[s < best_before]] = True
    return keep


def _segmented_cummin(values: np.ndarray, segment: np.ndarray) -> np.ndarray:
    out = values.copy()
    starts = np.flatnonzero(np.concatenate([[True], segment[1:] != segment[:-1]]))
    ends = np.concatenate([starts[1:], [len(values)]])
    for a, b in zip(starts, ends):
        out[a:b] = np.minimum.accumulate(values[a:b])
    return out


def _undominated(score: np.ndarray, use: np.ndarray, cap: int) -> np.ndarray:
    """Mask of combinations no other one beats (<= score and <= every row; exact ties keep one).

    One row: the exact staircase. Several rows: the staircase on the first row among
    combinations equal in all other rows (exact, fast), then, for groups of at most ``cap``,
    the full pairwise test.
    """
    n = len(score)
    if n <= 1:
        return np.ones(n, dtype=bool)
    if use.shape[0] == 1:
        return _pareto_2d(score, use[0], None)
    keep = _pareto_2d(score, use[0], use[1:])
    idx = np.flatnonzero(keep)
    if len(idx) > cap:
        return keep
    s, u = score[idx], use[:, idx]
    order = np.lexsort((*u[::-1], s))
    s, u = s[order], u[:, order]
    # dominated[i]: some j placed before i (so s_j <= s_i) uses no more of every row.
    le = np.all(u[:, :, None] <= u[:, None, :], axis=0)
    le &= np.tri(len(s), k=-1, dtype=bool).T
    dominated = le.any(axis=0)
    out = np.zeros(n, dtype=bool)
    out[idx[order[~dominated]]] = True
    return out


def _prune(
    groups: list[_Group], limit: np.ndarray, gap: float, dominance_cap: int, fresh: set[int]
) -> list[_Group]:
    """Drop dominated combinations of the ``fresh`` groups (new ones), then, until nothing
    changes, those that break a row or the bound even with the cheapest choice elsewhere.

    Dominance needs checking once per group: a combination dominated by another one is pruned
    by the row and bound tests whenever the dominating one is (it has no smaller score, use or
    reduced cost), so later passes cannot make it undominated.
    """
    tol = _tol(limit)
    gap_tol = gap + float(_tol(gap)) if math.isfinite(gap) else math.inf
    groups = [
        g.take(_undominated(g.score, g.use, dominance_cap)) if i in fresh else g for i, g in enumerate(groups)
    ]
    while True:
        before = sum(len(g) for g in groups)
        min_use = np.stack([g.use.min(axis=1) for g in groups], axis=1)  # [K, G]
        min_red = np.array([g.red.min() for g in groups])
        total_use, total_red = min_use.sum(axis=1), min_red.sum()
        out = []
        for i, g in enumerate(groups):
            other_use = total_use - min_use[:, i]
            ok = np.all(g.use + other_use[:, None] <= (limit + tol)[:, None], axis=0)
            ok &= g.red + (total_red - min_red[i]) <= gap_tol
            if not ok.any():
                raise InfeasibleError("no architecture satisfies every constraint together")
            out.append(g if ok.all() else g.take(ok))
        groups = out
        if sum(len(g) for g in groups) == before:
            return groups


def aggregate(
    problem: Problem,
    reduced: np.ndarray,
    gap: float,
    *,
    max_groups: int = 1,
    max_group_size: int = 2_000_000,
    dominance_cap: int = 2000,
    deadline: float = math.inf,
) -> list[_Group]:
    """Merge layers pairwise into groups of surviving combinations (exact; see the module doc).

    Stops at ``max_groups`` groups, or earlier when every possible merge would build more than
    ``max_group_size`` combinations before pruning, or when ``time.perf_counter()`` passes
    ``deadline``.
    """
    groups = []
    for layer in range(problem.num_layers):
        opts = np.flatnonzero(problem.valid[layer])
        groups.append(
            _Group(
                [layer],
                problem.score[layer, opts],
                problem.coef[:, layer, opts],
                reduced[layer, opts],
                opts[:, None],
            )
        )
    groups = _prune(groups, problem.limit, gap, dominance_cap, set(range(len(groups))))
    while len(groups) > max_groups and time.perf_counter() < deadline:
        groups.sort(key=len)
        merged: list[_Group] = []
        fresh: set[int] = set()
        changed = False
        i = 0
        while i < len(groups):
            wanted = len(merged) + (len(groups) - i) > max_groups and time.perf_counter() < deadline
            if wanted and i + 1 < len(groups) and len(groups[i]) * len(groups[i + 1]) <= max_group_size:
                fresh.add(len(merged))
                merged.append(_merge(groups[i], groups[i + 1]))
                changed = True
                i += 2
            else:
                merged.append(groups[i])
                i += 1
        if not changed:
            break
        groups = _prune(merged, problem.limit, gap, dominance_cap, fresh)
    return groups


# --------------------------------------------------------------------------- the MIP


def _solve_groups(
    problem: Problem, groups: list[_Group], start: np.ndarray | None, time_limit: float, threads: int
) -> tuple[np.ndarray | None, str]:
    solver = mip_solver()
    import mip

    with mip_session():
        model = mip.Model(sense=mip.MINIMIZE, solver_name=solver)
        model.verbose = 0
        model.threads = threads
        model.max_mip_gap = 0.0
        model.max_mip_gap_abs = 1e-12
        ys = [[model.add_var(var_type=mip.BINARY) for _ in range(len(g))] for g in groups]
        for y in ys:
            model.add_constr(mip.xsum(y) == 1)
        for k in range(problem.num_rows):
            terms = [
                float(g.use[k, i]) * y[i]
                for g, y in zip(groups, ys)
                for i in range(len(g))
                if g.use[k, i] != 0.0
            ]
            model.add_constr(mip.xsum(terms) <= float(problem.limit[k]))
        model.objective = mip.xsum(
            float(g.score[i]) * y[i] for g, y in zip(groups, ys) for i in range(len(g))
        )
        if start is not None:
            pairs: list[tuple[Any, float]] = []
            for g, y in zip(groups, ys):
                match = np.flatnonzero(np.all(g.choice == start[g.layers][None, :], axis=1))
                if len(match) == 0:
                    pairs = []
                    break
                pairs.append((y[int(match[0])], 1.0))
            if pairs:
                model.start = pairs
        status = model.optimize(max_seconds=time_limit)
        if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
            return None, status.name.lower()
        if model.num_solutions == 0:
            return None, "no_solution"
        choice = np.zeros(problem.num_layers, dtype=np.int64)
        for g, y in zip(groups, ys):
            picked = max(range(len(g)), key=lambda i: y[i].x)
            choice[g.layers] = g.choice[picked]
        return choice, "optimal" if status == mip.OptimizationStatus.OPTIMAL else "feasible"


def _best_in_group(problem: Problem, group: _Group) -> np.ndarray | None:
    ok = np.all(group.use <= (problem.limit + _tol(problem.limit))[:, None], axis=0)
    if not ok.any():
        return None
    best = int(np.argmin(np.where(ok, group.score, np.inf)))
    choice = np.zeros(problem.num_layers, dtype=np.int64)
    choice[group.layers] = group.choice[best]
    return choice


def check_rows(problem: Problem) -> None:
    """Raise :class:`InfeasibleError` when a row alone cannot be met by any architecture."""
    minimum = problem.row_minimum()
    for k in range(problem.num_rows):
        if minimum[k] > problem.limit[k] + _tol(problem.limit[k]):
            raise InfeasibleError(
                f"{problem.row_names[k]}: the smallest total any architecture reaches is {minimum[k]:.6g}, "
                f"above the limit {problem.limit[k]:.6g}",
                row=k,
                best=float(minimum[k]),
            )


@dataclass
class _Search:
    """What the bounded DP learned: the best architecture found and a proven lower bound."""

    best: np.ndarray | None
    upper: float
    lower: float
    proven: bool = False
    gaps: list[float] = field(default_factory=list)

    def offer(self, problem: Problem, choice: np.ndarray | None) -> None:
        if choice is not None:
            value = problem.totals(choice)[0]
            if value < self.upper:
                self.best, self.upper = choice, value


def _deepening_dp(
    problem: Problem, reduced: np.ndarray, bound: float, state: _Search, max_group_size: int, deadline: float
) -> None:
    """Run the DP with growing bound gaps until it proves the optimum, runs out of room or time.

    Pruning with a gap ``g`` keeps every architecture whose objective is at most ``bound + g``.
    So when the best one left is within that, it is the optimum; when none is, the optimum is
    above ``bound + g`` (a better lower bound). Small gaps make small DPs, and the optimum is
    usually much closer to the bound than the heuristic's incumbent.
    """
    full = state.upper - bound
    # Start near the bound: real libraries have their optimum within ~0.05 % of it.
    gap = (
        min(full, max(full / 64, 1e-5 * abs(bound), float(_tol(bound)))) if math.isfinite(full) else math.inf
    )
    while time.perf_counter() < deadline:
        gap = min(gap, state.upper - bound)
        state.gaps.append(gap)
        try:
            groups = aggregate(
                problem, reduced, gap, max_groups=1, max_group_size=max_group_size, deadline=deadline
            )
        except InfeasibleError:
            groups = []  # nothing within this gap
        if len(groups) > 1:
            return  # the DP ran out of room or time
        found = _best_in_group(problem, groups[0]) if groups else None
        state.offer(problem, found)
        limit = bound + gap
        if found is not None and problem.totals(found)[0] <= limit + float(_tol(limit)):
            state.proven = True
            state.lower = state.upper
            return
        if state.best is not None and state.upper <= limit + float(_tol(limit)):
            # Everything better than the incumbent was in this DP and none was found.
            state.proven = True
            state.lower = state.upper
            return
        if not math.isfinite(gap):
            if state.best is None:
                raise InfeasibleError("no architecture satisfies every constraint together")
            return
        state.lower = max(state.lower, limit)
        gap *= 2


def solve(
    problem: Problem,
    *,
    time_limit: float = 60.0,
    max_group_size: int | None = None,
    threads: int = 1,
) -> Result:
    """The best architecture: proven optimal by the DP, else the best CBC finds in the time left.

    The result's ``stats`` say how it was proven (``proof``: ``dp`` or ``cbc``, the MIP backend
    whichever :func:`mip_solver` chose, named in ``solver``), the lower bound and the remaining gap
    when it was not, and the time spent in each stage.
    """
    started = time.perf_counter()
    deadline = started + time_limit
    if max_group_size is None:  # several rows prune less, so groups must stay smaller
        max_group_size = 2_000_000 if problem.num_rows == 1 else 200_000
    check_rows(problem)
    duals = _lp_duals(problem)
    if duals is None:
        raise InfeasibleError("the constraints cannot all be met together (the LP relaxation is infeasible)")
    lam, lp_bound = duals
    bound, reduced = lagrangian(problem, lam)
    start = np.where(problem.valid, reduced, np.inf).argmin(axis=1)
    incumbent = heuristic(problem, start, reduced)
    state = _Search(None, math.inf, bound)
    state.offer(problem, incumbent)
    heuristic_value = state.upper
    t_heuristic = time.perf_counter()
    # The DP gets most of the time; CBC, if needed, the rest.
    dp_deadline = started + 0.75 * time_limit
    _deepening_dp(problem, reduced, bound, state, max_group_size, dp_deadline)
    t_dp = time.perf_counter()
    if state.proven:
        # python-mip records the proven optimum: CBC solves the final aggregated model (the
        # combinations within the proving gap), started at the optimum, and must agree.
        try:
            groups = aggregate(problem, reduced, state.gaps[-1], max_groups=1, max_group_size=max_group_size)
        except InfeasibleError:  # only at the tolerance's edge: hand CBC the optimum alone
            groups = []
        if len(groups) != 1:
            assert state.best is not None
            groups = [
                _Group(
                    list(range(problem.num_layers)),
                    np.array([state.upper]),
                    problem.totals(state.best)[1][:, None],
                    np.zeros(1),
                    state.best[None, :],
                )
            ]
        proof = "dp"
    else:
        gap = state.upper - bound
        groups = aggregate(
            problem, reduced, gap, max_groups=problem.num_layers, max_group_size=max_group_size
        )
        proof = "none"
    try:
        choice, cbc_status = _solve_groups(
            problem, groups, state.best, max(0.2, deadline - time.perf_counter()), threads
        )
    except Exception as exc:  # noqa: BLE001 - a MIP backend's own failure (HiGHS: "Unknown error")
        if state.best is None:
            raise
        # The DP's optimum (proven) or incumbent (not proven) stands without the MIP's confirmation.
        log.warning("the MIP solver (%s) failed (%s); keeping the exact DP's answer", mip_solver(), exc)
        choice, cbc_status = None, f"error: {type(exc).__name__}"
    t_mip = time.perf_counter()
    cbc_objective = problem.totals(choice)[0] if choice is not None else None
    if state.proven and cbc_objective is not None and cbc_objective > state.upper + float(_tol(state.upper)):
        log.warning(
            "CBC returned %.9g (%s) where the exact DP proves %.9g; keeping the DP's optimum",
            cbc_objective,
            cbc_status,
            state.upper,
        )
    if not state.proven:
        state.offer(problem, choice)
        if cbc_status == "optimal" and choice is not None and problem.totals(choice)[0] <= state.upper:
            proof = "cbc"
    if state.best is None:
        raise InfeasibleError(
            f"no architecture found: CBC ended with status {cbc_status} and the heuristic found none"
        )
    status = "optimal" if proof in ("dp", "cbc") else "feasible"
    objective = state.upper
    stats = {
        "proof": proof,
        "solver": mip_solver(),
        "lower_bound": state.lower if proof != "cbc" else objective,
        "gap": 0.0 if status == "optimal" else objective - state.lower,
        "cbc_status": cbc_status,
        "cbc_objective": cbc_objective,
        "lp_bound": lp_bound,
        "heuristic_objective": heuristic_value if math.isfinite(heuristic_value) else None,
        "options": int(problem.valid.sum()),
        "dp_gaps": state.gaps,
        "mip_groups": len(groups),
        "mip_variables": int(sum(len(g) for g in groups)),
        "heuristic_seconds": t_heuristic - started,
        "dp_seconds": t_dp - t_heuristic,
        "mip_seconds": t_mip - t_dp,
    }
    log.debug("knapsack: %s", stats)
    return Result([int(c) for c in state.best], objective, status, time.perf_counter() - started, stats)
