"""``puzzle run --jobs N``: the run's units (stages, shards, baselines) on N worker processes.

A unit starts as soon as every unit it reads has finished, so BLD and scoring shards run side by
side, the baselines beside the search -> realize -> GKD chain, the cost table beside scoring.
Each worker is a fresh (spawned) process; on CUDA each owns one GPU for its whole life (the i-th of
those ``CUDA_VISIBLE_DEVICES`` shows this process, so ``--jobs 2`` on a 4-GPU machine with
``CUDA_VISIBLE_DEVICES=2,3`` uses GPUs 2 and 3), and a unit measuring speed there (the cost table,
the search's measured check, the evaluation) has its GPU to itself. On a CPU the workers share the
cores (each gets 1/N of torch's threads: the cores, or ``OMP_NUM_THREADS`` where set), so a unit
that measures speed runs alone: it waits for the running units and nothing starts beside it.

Everything else is :class:`puzzle.run.Runner`'s: which units are up to date, rebuilt or stale, the
records, MLflow, in the main process. When a unit fails, no new unit starts, the running ones finish
(their work is kept for the resume), then the first error is raised.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import logging
import multiprocessing
import os
import pickle
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from puzzle.errors import PuzzleError

if TYPE_CHECKING:
    from puzzle.io.artifacts import Manifest
    from puzzle.run import Runner, Unit

log = logging.getLogger(__name__)


class JobsError(PuzzleError, ValueError):
    """``--jobs`` asks for more workers than this machine has GPUs (or cores), or for a device that
    cannot be shared out."""


def _kind(device: str) -> str:
    """``cuda`` or ``cpu`` for the run's ``device`` setting (without starting CUDA here)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":", 1)[0]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        return [g.strip() for g in listed.split(",") if g.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def check_jobs(jobs: int, device: str) -> None:
    """Refuse a ``--jobs`` this machine cannot serve, before any work starts."""
    if jobs < 1:
        raise JobsError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1:
        return
    kind = _kind(device)
    if kind == "cuda":
        if ":" in device:
            raise JobsError(
                f"--jobs {jobs} gives each worker a GPU of its own, but device is pinned to {device!r}: "
                "set device: cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
            )
        gpus = visible_gpus()
        if jobs > len(gpus):
            raise JobsError(
                f"--jobs {jobs} runs one worker per GPU, but {len(gpus)} GPU(s) are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                f"use --jobs {max(1, len(gpus))} or fewer"
            )
    elif kind == "cpu":
        cores = os.cpu_count() or 1
        if jobs > cores:
            raise JobsError(
                f"--jobs {jobs} is more than this machine's {cores} CPU cores: use --jobs {cores}"
            )
    else:
        raise JobsError(f"--jobs {jobs} needs device cuda or cpu, not {device!r}: use --jobs 1")


def _init_worker(slots: Any, level: int, threads: int | None) -> None:
    """A new worker: take a GPU (or none), set up logging like the parent's, size its CPU threads."""
    slot = slots.get()
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot
    where = f"gpu {slot}" if slot is not None else f"worker {os.getpid()}"
    logging.basicConfig(
        level=level, format=f"%(asctime)s %(levelname)s [{where}] %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _build(build: Callable[[], Manifest]) -> Manifest:
    """Run one unit in a worker; free its GPU memory afterwards. An error that cannot travel back
    to the main process (not picklable) comes back as a RuntimeError with its text."""
    try:
        return build()
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from None
        raise
    finally:
        gc.collect()
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def run_units(runner: Runner, units: list[Unit], *, jobs: int, device: str) -> None:
    """Build ``units`` (in dependency order, ``jobs`` at a time) through ``runner``'s bookkeeping."""
    kind = _kind(device)
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    gpus: list[str | None] = list(visible_gpus()[:jobs]) if kind == "cuda" else [None] * jobs
    for slot in gpus:
        slots.put(slot)
    import torch

    threads = max(1, torch.get_num_threads() // jobs) if kind == "cpu" else None
    level = logging.getLogger().getEffectiveLevel()

    def alone(unit: Unit) -> bool:  # measures speed on shared CPU cores
        return kind == "cpu" and unit.stage.target_gpu

    pending = list(units)
    finished: set[str] = set()
    running: dict[cf.Future[Manifest], tuple[Unit, Manifest | None, float]] = {}
    error: BaseException | None = None
    log.info("running %d units on %d workers (%s)", len(units), jobs, kind)
    with cf.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(slots, level, threads)
    ) as pool:
        while pending or running:
            while error is None and len(running) < jobs:
                unit = _next_ready(pending, finished, running, alone)
                if unit is None:
                    break
                pending.remove(unit)
                before = runner.prepare(unit)
                running[pool.submit(_build, unit.build)] = (unit, before, time.perf_counter())
                log.info("started %s (%d running)", unit.phase, len(running))
            if not running:
                if error is None and pending:
                    waiting = ", ".join(u.phase for u in pending)
                    raise RuntimeError(f"units wait on units that never run: {waiting} (a bug in the plan)")
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                unit, before, started = running.pop(future)
                try:
                    manifest = future.result()
                except cf.process.BrokenProcessPool as exc:
                    broken = RuntimeError(
                        f"a worker process died while building {unit.phase} ({unit.uri}): out of memory? "
                        "(its finished work is kept: run the same command to resume)"
                    )
                    broken.__cause__ = exc
                    error = error or broken
                    continue
                except Exception as exc:
                    log.error("%s failed: %s", unit.phase, exc)
                    error = error or exc
                    continue
                runner.finish(unit, before, manifest, time.perf_counter() - started)
                finished.add(unit.phase)
            if error is not None and running:
                log.warning(
                    "a unit failed; waiting for the %d running (%s) to finish, their work is kept",
                    len(running),
                    ", ".join(u.phase for u, _, _ in running.values()),
                )
    if error is not None:
        raise error


def _next_ready(
    pending: list[Unit],
    finished: set[str],
    running: dict[Any, tuple[Unit, Any, float]],
    alone: Callable[[Unit], bool],
) -> Unit | None:
    """The first pending unit whose inputs are finished and that may start beside the running ones.
    A unit that must run alone holds back everything after it until it can."""
    if any(alone(u) for u, _, _ in running.values()):
        return None
    for unit in pending:
        if not all(a in finished for a in unit.after):
            continue
        if alone(unit):
            return None if running else unit
        return unit
    return None
