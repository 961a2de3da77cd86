"""The MIP backend choice of puzzle.search.knapsack: CBC when it loads, else HiGHS, or what
PUZZLE_MIP_SOLVER forces; a clear error when none loads."""

from __future__ import annotations

import numpy as np
import pytest

from puzzle.search import knapsack
from puzzle.search.knapsack import SOLVER_ENV, SolverUnavailableError, mip_solver


@pytest.fixture
def available(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Pretend which backends load (mutate the returned mapping)."""
    state = {"cbc": True, "highs": True}
    monkeypatch.setattr(knapsack, "backend_available", lambda name: state[name])
    monkeypatch.delenv(SOLVER_ENV, raising=False)
    return state


def test_auto_prefers_cbc(available: dict[str, bool]) -> None:
    assert mip_solver() == "CBC"


def test_auto_falls_back_to_highs(available: dict[str, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    available["cbc"] = False
    assert mip_solver() == "HiGHS"
    monkeypatch.setenv(SOLVER_ENV, "auto")
    assert mip_solver() == "HiGHS"


def test_env_forces_a_backend(available: dict[str, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SOLVER_ENV, " HiGHS ")
    assert mip_solver() == "HiGHS"
    monkeypatch.setenv(SOLVER_ENV, "cbc")
    assert mip_solver() == "CBC"
    available["cbc"] = False
    with pytest.raises(SolverUnavailableError, match=r"PUZZLE_MIP_SOLVER=cbc.*cbcbox.*unset"):
        mip_solver()


def test_no_backend_is_a_clear_error(available: dict[str, bool]) -> None:
    available.update(cbc=False, highs=False)
    with pytest.raises(SolverUnavailableError, match=r"CBC nor HIGHS.*cbcbox or highsbox"):
        mip_solver()


def test_unknown_choice(available: dict[str, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SOLVER_ENV, "gurobi")
    with pytest.raises(SolverUnavailableError, match="must be one of auto, cbc, highs"):
        mip_solver()


def test_unknown_backend_is_unavailable() -> None:
    assert knapsack.backend_available("cbc") in (True, False)
    with pytest.raises(KeyError):
        knapsack.backend_available("glpk")


def _problem(seed: int) -> knapsack.Problem:
    rng = np.random.default_rng(seed)
    layers, options = 24, 10
    score = rng.random((layers, options))
    score[:, 0] = 0.0  # the parent's block: best score, most cost
    coef = rng.random((2, layers, options))
    coef[:, :, 0] = 1.0
    return knapsack.Problem(score, coef, np.array([0.6 * layers, 0.7 * layers]), np.ones_like(score, bool))


@pytest.mark.parametrize("seed", [0, 1])
def test_highs_and_cbc_agree(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole solver (LP duals, DP, final MIP) on either backend gives the same optimum."""
    if not knapsack.backend_available("highs"):
        pytest.skip("python-mip's HiGHS backend needs highsbox (pip install highsbox)")
    problem = _problem(seed)
    monkeypatch.setenv(SOLVER_ENV, "highs")
    highs = knapsack.solve(problem, time_limit=20)
    assert highs.stats["solver"] == "HiGHS"
    assert highs.status == "optimal" and problem.is_feasible(highs.choice)
    if not knapsack.backend_available("cbc"):
        return
    monkeypatch.setenv(SOLVER_ENV, "cbc")
    cbc = knapsack.solve(problem, time_limit=20)
    assert cbc.stats["solver"] == "CBC"
    assert highs.objective == pytest.approx(cbc.objective, rel=1e-9, abs=1e-12)
    assert highs.stats["lp_bound"] == pytest.approx(cbc.stats["lp_bound"], rel=1e-6, abs=1e-9)


def test_a_failing_mip_backend_leaves_the_dp_optimum(monkeypatch: pytest.MonkeyPatch) -> None:
    """HiGHS through python-mip raised "Unknown error in call to HiGHS" on an H100 machine's run:
    the final MIP only confirms the DP's proven optimum, so its failure must not lose it."""
    problem = _problem(0)
    exact = knapsack.solve(problem, time_limit=20)
    assert exact.stats["proof"] == "dp"

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - _solve_groups' signature
        raise RuntimeError("Unknown error in call to HiGHS.")

    monkeypatch.setattr(knapsack, "_solve_groups", broken)
    kept = knapsack.solve(problem, time_limit=20)
    assert kept.choice == exact.choice and kept.status == "optimal"
    assert kept.stats["cbc_status"] == "error: RuntimeError"
