"""``puzzle run``: the stage graph (:mod:`puzzle.stages`) executed in order on this machine.

Each stage writes one artifact under the config's ``output`` (a local directory or ``s3://``), in
the folder its stage graph entry names (``parent/``, ``tokens/``, ``library/``, ``trained/``,
``scores/``, ``costs/``, ``solutions/``, ``child/``, ``distilled/``, ``baselines/<method>/``,
``evaluation/``, ``export/``); sharded stages keep their shards under ``<name>-shards/``.

Resume: a phase whose artifact already exists for the same inputs and parameters is skipped
(:func:`puzzle.io.artifacts.run_phase`), so running the same configuration again does nothing,
and a run that was killed continues where it stopped (GKD and BLD from their last checkpoint).
When a phase is rebuilt, every phase that reads it is rebuilt too, even where the new output
happens to be byte-identical to the old.

Tracking: the whole run is one MLflow run (when a tracking URI is configured) with one nested
run per phase, through :mod:`puzzle.mlflow.tracking`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from puzzle.config import RunConfig, check_storage
from puzzle.errors import PuzzleError
from puzzle.io import artifacts, storage
from puzzle.io.artifacts import Manifest
from puzzle.stages import STAGES, Stage

log = logging.getLogger(__name__)

PUZZLE_CHILD = "puzzle"


@dataclass
class PhaseRecord:
    """What one phase did in this invocation."""

    phase: str
    uri: str
    kind: str
    rebuilt: bool
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    """When it started (``time.time()``): with ``--jobs``, which phases ran at once."""


@dataclass
class RunResult:
    config: RunConfig
    phases: list[PhaseRecord] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    registration: Any = None
    gate: Any = None

    def record(self, phase: str) -> PhaseRecord:
        for rec in self.phases:
            if rec.phase == phase:
                return rec
        raise KeyError(phase)

    @property
    def rebuilt(self) -> list[str]:
        return [r.phase for r in self.phases if r.rebuilt]

    @property
    def export_uri(self) -> str:
        return self.record("export").uri

    @property
    def evaluation_uri(self) -> str:
        return self.record("evaluate").uri


def _invalidate(uri: str) -> None:
    """Remove a published artifact so that its phase rebuilds it (its staging, with any
    checkpoints, is kept). The whole artifact goes, not only its manifest: a folder of files
    without a manifest is what the publish rule protects as a user's."""
    if storage.exists(storage.join(uri, artifacts.MANIFEST)):
        storage.delete_tree(uri)


@dataclass
class Unit:
    """One piece of work of a stage: the whole stage, one shard or item of it, or its shards' merge."""

    phase: str
    """Its name in records and logs: ``bld``, ``bld-shard-0``, ``baselines-greedy``."""
    stage: Stage
    uri: str
    deps: list[str]
    """Phases whose rebuilding makes this one stale (see :meth:`Runner.step`)."""
    after: list[str]
    """Units that must have finished before this one starts."""
    build: Callable[[], Manifest]
    """Builds (or skips) the artifact; a picklable ``functools.partial`` (it may run in a worker)."""


class Runner:
    """Runs the stages of one configuration: in the graph's order, or with ``jobs`` > 1 every unit as
    soon as what it reads is there, on ``jobs`` worker processes (:mod:`puzzle.workers`)."""

    def __init__(
        self,
        config: RunConfig,
        *,
        on_phase: Callable[[PhaseRecord], None] | None = None,
        jobs: int = 1,
        until: str | None = None,
        force: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.on_phase = on_phase
        self.jobs = jobs
        self.until = until
        self.force = set(force)
        self.result = RunResult(config)
        self._rebuilt: set[str] = set()

    def uri(self, *parts: str) -> str:
        return storage.join(self.config.output, *parts)

    def stages(self) -> list[Stage]:
        """The enabled stages this invocation runs (up to ``until``), in the graph's order."""
        chosen: list[Stage] = []
        for stage in STAGES:
            if stage.enabled(self.config):
                chosen.append(stage)
            if stage.name == self.until:
                break
        return chosen

    def step(self, unit: Unit, build: Callable[[Unit], Manifest] | None = None) -> Manifest:
        """Run one unit (or skip it); rebuild it when a phase it depends on was rebuilt."""
        before = self.prepare(unit)
        t0 = time.perf_counter()
        manifest = build(unit) if build is not None else unit.build()
        return self.finish(unit, before, manifest, time.perf_counter() - t0)

    def prepare(self, unit: Unit) -> Manifest | None:
        """Before ``unit`` runs: its published manifest, or None once a rebuilt dependency made it stale."""
        before = artifacts.read_manifest(unit.uri)
        stale = [d for d in unit.deps if d in self._rebuilt]
        if before is not None and stale:
            log.info("%s: %s was rebuilt, so %s is rebuilt too", unit.phase, ", ".join(stale), unit.uri)
            _invalidate(unit.uri)
            before = None
        return before

    def finish(self, unit: Unit, before: Manifest | None, manifest: Manifest, seconds: float) -> Manifest:
        """After ``unit`` ran: record it, log it to MLflow, tell ``on_phase``."""
        from puzzle.mlflow import tracking

        rebuilt = before is None or manifest.created_at != before.created_at
        if rebuilt:
            self._rebuilt.add(unit.phase)
            if unit.phase != unit.stage.name and unit.stage.items is not None:
                self._rebuilt.add(unit.stage.name)  # an item rebuilt: what reads the stage is stale
        record = PhaseRecord(
            unit.phase,
            unit.uri,
            manifest.kind,
            rebuilt,
            seconds,
            dict(manifest.summary),
            time.time() - seconds,
        )
        self.result.phases.append(record)
        log.info(
            "phase %s: %s in %.1f s (%s)", unit.phase, "built" if rebuilt else "up to date", seconds, unit.uri
        )
        tracking.log_phase(manifest.kind, unit.uri, manifest, name=unit.phase)
        if self.on_phase is not None:
            self.on_phase(record)
        return manifest

    def output_of(self, stage: Stage) -> Any:
        """Where ``stage`` writes: its URI, or a mapping item -> URI for a stage run per item."""
        fan = stage.fan_out(self.config)
        if stage.items is not None and fan is not None:
            return {str(item): self.uri(stage.folder, str(item)) for item in fan}
        return self.uri(stage.folder)

    def plan(self) -> list[Unit]:
        """Every unit of this invocation, in the order a sequential run builds them."""
        outputs = self.result.outputs
        units: list[Unit] = []
        last: dict[str, list[str]] = {}  # stage -> the units that finish it
        for stage in self.stages():
            if not stage.output:
                continue
            inputs = {param: outputs[producer] for param, producer in stage.inputs.items()}
            args, kwargs = stage.arguments(self.config, inputs)
            deps = sorted(set(stage.inputs.values()))
            after = sorted({u for producer in deps for u in last.get(producer, [])})
            function = stage.resolve()
            outputs[stage.name] = out = self.output_of(stage)
            fan = stage.fan_out(self.config)
            if fan is None:
                build = functools.partial(function, *args, out, **kwargs)
                units.append(Unit(stage.name, stage, out, deps, after, build))
                last[stage.name] = [stage.name]
            elif stage.items is not None:
                names = [f"{stage.name}-{item}" for item in fan]
                for item, name in zip(fan, names, strict=True):
                    build = functools.partial(function, item, *args, out[str(item)], **kwargs)
                    units.append(Unit(name, stage, out[str(item)], deps, after, build))
                last[stage.name] = names
            else:
                count = len(fan)
                names = [f"{stage.name}-shard-{i}" for i in fan]
                shard_uris = [self.uri(f"{stage.folder}-shards", f"shard-{i}-of-{count}") for i in fan]
                for i, name, shard_out in zip(fan, names, shard_uris, strict=True):
                    build = functools.partial(function, *args, shard_out, **kwargs, shard=f"{i}/{count}")
                    units.append(Unit(name, stage, shard_out, deps, after, build))
                merge = functools.partial(stage.resolve("merge"), shard_uris, out)
                units.append(Unit(stage.name, stage, out, names, names, merge))
                last[stage.name] = [stage.name]
        return units

    def register(self, stage: Stage, run: Any) -> None:
        """The registry stage: register the export (alias candidate) and apply the gates."""
        inputs = {param: self.result.outputs[producer] for param, producer in stage.inputs.items()}
        args, kwargs = stage.arguments(self.config, inputs)
        self.result.registration, self.result.gate = stage.resolve()(
            *args, **kwargs, output=self.config.output, pipeline_run_id=getattr(run, "run_id", None)
        )

    def run(self) -> RunResult:
        from puzzle.mlflow import tracking

        cfg = self.config
        with tracking.pipeline_run(cfg, name=f"puzzle-{cfg.digest}") as run:
            units = self.plan()
            for unit in units:
                if unit.stage.name in self.force and artifacts.read_manifest(unit.uri) is not None:
                    log.warning("%s: rebuilt as asked (--force %s)", unit.uri, unit.stage.name)
                    _invalidate(unit.uri)
            if self.jobs > 1:
                from puzzle.workers import run_units

                run_units(self, units, jobs=self.jobs, device=cfg.device)
            else:
                for unit in units:
                    self.step(unit)
            for stage in self.stages():
                if not stage.output:
                    self.register(stage, run)
        return self.result


def output_uris(config: RunConfig) -> list[tuple[str, tuple[str, ...]]]:
    """``(uri, kind)`` of every artifact ``config`` writes (shards and items included)."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for stage in STAGES:
        if not stage.output or not stage.enabled(config):
            continue
        fan = stage.fan_out(config)
        root = storage.join(config.output, stage.folder)
        if fan is not None and stage.items is not None:
            out += [(storage.join(root, str(item)), stage.kinds) for item in fan]
            continue
        if fan is not None:
            shards = storage.join(config.output, f"{stage.folder}-shards")
            out += [(storage.join(shards, f"shard-{i}-of-{len(fan)}"), stage.kinds) for i in fan]
        out.append((root, stage.kinds))
    return out


def check_outputs(config: RunConfig) -> None:
    """The publish rule (:func:`puzzle.io.artifacts.check_output`) for every output of the run,
    before any phase runs: no user's folder or file under ``output`` is ever replaced."""
    for uri, kind in output_uris(config):
        artifacts.check_output(uri, kind)


def run(
    config: RunConfig,
    *,
    on_phase: Callable[[PhaseRecord], None] | None = None,
    check_access: bool = True,
    jobs: int = 1,
    until: str | None = None,
    force: tuple[str, ...] = (),
) -> RunResult:
    """Run every stage of ``config`` (skipping those already done); see the module docstring.

    ``jobs`` > 1: independent units (shards, baselines, a stage beside another) run at once on that
    many worker processes, one GPU each on CUDA (:mod:`puzzle.workers`). ``until``: stop after that
    stage. ``force``: rebuild these stages (and, as always, every stage that reads them) even where
    their outputs are up to date (a corrupt or doubted artifact)."""
    from puzzle.workers import check_jobs

    names = [s.name for s in STAGES if s.output]
    for flag, value in [("--until", until), *[("--force", f) for f in force]]:
        if value is not None and value not in names:
            raise PuzzleError(f"{flag} {value!r} is not a stage; the stages: {', '.join(names)}")
    check_jobs(jobs, config.device)
    if check_access:
        check_storage(config)
    check_outputs(config)
    return Runner(config, on_phase=on_phase, jobs=jobs, until=until, force=tuple(force)).run()
