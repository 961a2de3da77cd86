"""The suite's torch threads follow the load: a second thread only where a second core is free."""

from __future__ import annotations

import pytest
from threads import suite_threads, threads_for


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [(2, 0.0, 2), (2, 0.7, 2), (2, 0.8, 1), (2, 2.0, 1), (2, 6.3, 1), (1, 0.0, 1), (16, 3.0, 2)],
)
def test_threads_follow_the_cores_the_load_leaves_free(cores: int, load: float, expected: int) -> None:
    assert threads_for(cores, load) == expected


def test_puzzle_test_threads_overrides_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUZZLE_TEST_THREADS", "3")
    assert suite_threads() == 3
    monkeypatch.setenv("PUZZLE_TEST_THREADS", "two")
    with pytest.raises(ValueError, match="PUZZLE_TEST_THREADS must be a positive integer"):
        suite_threads()
