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


class Runner:
    """Runs the stages of one configuration, in the graph's order."""

    def __init__(self, config: RunConfig, *, on_phase: Callable[[PhaseRecord], None] | None = None) -> None:
        self.config = config
        self.on_phase = on_phase
        self.result = RunResult(config)
        self._rebuilt: set[str] = set()

    def uri(self, *parts: str) -> str:
        return storage.join(self.config.output, *parts)

    def step(self, phase: str, uri: str, deps: list[str], build: Callable[[], Manifest]) -> Manifest:
        """Run one phase (or skip it); rebuild it when a phase it depends on was rebuilt."""
        from puzzle.mlflow import tracking

        before = artifacts.read_manifest(uri)
        stale = [d for d in deps if d in self._rebuilt]
        if before is not None and stale:
            log.info("%s: %s was rebuilt, so %s is rebuilt too", phase, ", ".join(stale), uri)
            _invalidate(uri)
            before = None
        t0 = time.perf_counter()
        manifest = build()
        seconds = time.perf_counter() - t0
        rebuilt = before is None or manifest.created_at != before.created_at
        if rebuilt:
            self._rebuilt.add(phase)
        record = PhaseRecord(phase, uri, manifest.kind, rebuilt, seconds, dict(manifest.summary))
        self.result.phases.append(record)
        log.info("phase %s: %s in %.1f s (%s)", phase, "built" if rebuilt else "up to date", seconds, uri)
        tracking.log_phase(manifest.kind, uri, manifest, name=phase)
        if self.on_phase is not None:
            self.on_phase(record)
        return manifest

    def execute(self, stage: Stage) -> Any:
        """Run one stage (fanned out over its shards or items); returns its output URI, or a
        mapping item -> URI for a stage run per item."""
        outputs = self.result.outputs
        inputs = {param: outputs[producer] for param, producer in stage.inputs.items()}
        args, kwargs = stage.arguments(self.config, inputs)
        deps = sorted(set(stage.inputs.values()))
        function = stage.resolve()
        out = self.uri(stage.folder)
        fan = stage.fan_out(self.config)
        if fan is None:
            self.step(stage.name, out, deps, lambda: function(*args, out, **kwargs))
            return out
        if stage.items is not None:
            results: dict[str, str] = {}
            for item in fan:
                item_out = self.uri(stage.folder, str(item))
                self.step(
                    f"{stage.name}-{item}",
                    item_out,
                    deps,
                    functools.partial(function, item, *args, item_out, **kwargs),
                )
                results[str(item)] = item_out
                if f"{stage.name}-{item}" in self._rebuilt:
                    self._rebuilt.add(stage.name)
            return results
        count = len(fan)
        shard_uris = []
        for i in fan:
            shard_out = self.uri(f"{stage.folder}-shards", f"shard-{i}-of-{count}")
            self.step(
                f"{stage.name}-shard-{i}",
                shard_out,
                deps,
                functools.partial(function, *args, shard_out, **kwargs, shard=f"{i}/{count}"),
            )
            shard_uris.append(shard_out)
        merge = stage.resolve("merge")
        self.step(stage.name, out, [f"{stage.name}-shard-{i}" for i in fan], lambda: merge(shard_uris, out))
        return out

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
            for stage in STAGES:
                if not stage.enabled(cfg):
                    continue
                if not stage.output:
                    self.register(stage, run)
                    continue
                self.result.outputs[stage.name] = self.execute(stage)
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
    config: RunConfig, *, on_phase: Callable[[PhaseRecord], None] | None = None, check_access: bool = True
) -> RunResult:
    """Run every stage of ``config`` (skipping those already done); see the module docstring."""
    if check_access:
        check_storage(config)
    check_outputs(config)
    return Runner(config, on_phase=on_phase).run()
