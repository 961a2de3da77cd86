"""How many CPU threads the suite's torch work uses: the cores other work leaves free.

Two torch (OpenMP) threads on a 2-core machine that other processes keep busy spend most of their
time waiting for each other at every parallel region (measured on this machine with two busy loops
beside it: a SmolLM2-sized decode step took 2.3x as long with 2 threads as with 1; idle, 2 threads
train 1.3x faster). So the suite takes 2 threads only while a second core is free, judged from
how busy the CPUs are over half a second when the session starts (not the load average, which
still counts the lint and type check that ``make test`` has just run). ``PUZZLE_TEST_THREADS``
overrides the choice.
"""

from __future__ import annotations

import math
import os
import time


def threads_for(cores: int, busy: float, most: int = 2) -> int:
    """Threads for ``cores`` CPUs of which ``busy`` are in use by other work: the cores left free
    (a core counts as free when less than three quarters of it is in use), at least 1, at most
    ``most``."""
    free = math.ceil(cores - busy - 0.25)
    return max(1, min(most, cores, free))


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - idle, total


def busy_cores(interval: float = 0.5) -> float:
    """How many cores are in use right now (over ``interval`` seconds); the 1-minute load average
    where /proc/stat does not exist."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(interval)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return cores * (busy1 - busy0) / max(1, total1 - total0)


def suite_threads() -> tuple[int, str]:
    """The thread count for this test session and why (``PUZZLE_TEST_THREADS`` if set)."""
    forced = os.environ.get("PUZZLE_TEST_THREADS")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"PUZZLE_TEST_THREADS must be a positive integer, got {forced!r}")
        return int(forced), "PUZZLE_TEST_THREADS"
    busy = busy_cores()
    cores = os.cpu_count() or 1
    return threads_for(cores, busy), f"{busy:.1f} of {cores} cores busy at the start"
