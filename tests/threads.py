"""How many CPU threads the suite's torch work uses: the cores other work leaves free.

Two torch (OpenMP) threads on a 2-core machine that other processes keep busy spend most of their
time waiting for each other at every parallel region (measured on this machine with two busy loops
beside it: a SmolLM2-sized decode step took 2.3x as long with 2 threads as with 1; idle, 2 threads
train 1.3x faster). So the suite takes 2 threads only while the load average leaves a second core
free. ``PUZZLE_TEST_THREADS`` overrides the choice.
"""

from __future__ import annotations

import math
import os


def threads_for(cores: int, load: float, most: int = 2) -> int:
    """Threads for ``cores`` CPUs at a 1-minute ``load`` average: the cores left free (a core
    counts as free when less than three quarters of it is in use), at least 1, at most ``most``."""
    free = math.ceil(cores - load - 0.25)
    return max(1, min(most, cores, free))


def suite_threads() -> int:
    """The thread count for this test session (``PUZZLE_TEST_THREADS`` if set)."""
    forced = os.environ.get("PUZZLE_TEST_THREADS")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"PUZZLE_TEST_THREADS must be a positive integer, got {forced!r}")
        return int(forced)
    return threads_for(os.cpu_count() or 1, os.getloadavg()[0])
