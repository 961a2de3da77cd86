"""The suite's torch threads follow the load: a second thread only where a second core is free."""

from __future__ import annotations

import pytest
from threads import busy_cores, suite_threads, threads_for


@pytest.mark.parametrize(
    ("cores", "busy", "expected"),
    [(2, 0.0, 2), (2, 0.7, 2), (2, 0.8, 1), (2, 2.0, 1), (2, 6.3, 1), (1, 0.0, 1), (16, 3.0, 2)],
)
def test_threads_follow_the_cores_other_work_leaves_free(cores: int, busy: float, expected: int) -> None:
    assert threads_for(cores, busy) == expected


def test_puzzle_test_threads_overrides_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUZZLE_TEST_THREADS", "3")
    assert suite_threads() == (3, "PUZZLE_TEST_THREADS")
    monkeypatch.setenv("PUZZLE_TEST_THREADS", "two")
    with pytest.raises(ValueError, match="PUZZLE_TEST_THREADS must be a positive integer"):
        suite_threads()


def test_busy_cores_sees_a_busy_loop_beside_it() -> None:
    """One process spinning beside the measurement counts as (about) one busy core."""
    import subprocess
    import sys

    idle = busy_cores(0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = busy_cores(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.7, f"a busy loop beside it, yet only {busy:.2f} cores busy (before it: {idle:.2f})"
