"""``puzzle run``: every phase in order, from the parent to the exported (and registered) child.

convert -> data -> library -> BLD -> scores -> costs -> search (+ baselines) -> realize -> GKD ->
evaluate -> export (-> register + gate when ``registry.model_name`` is set).

Each phase writes one artifact under the output root (local directory or ``s3://``)::

    child/ tokens/ library/ bld/ scores/ costs/ solutions/ realized/ distilled/ evaluation/ export/
    baselines/<method>/{solutions,realized,distilled}/

Resume: a phase whose artifact already exists for the same inputs and parameters is skipped
(:func:`puzzle.artifacts.run_phase`), so running the same configuration again does nothing, and
a run that was killed continues where it stopped (GKD and BLD from their last checkpoint).
Deleting one phase's output re-runs that phase and every phase after it that depends on it:
when a phase is rebuilt, its dependants are rebuilt too, even where the new output happens to
be byte-identical to the old.

Tracking: the whole run is one MLflow run (when a tracking URI is configured) with one nested
run per phase, through :mod:`puzzle.tracking`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from puzzle.config import RunConfig, check_storage
from puzzle.io import artifacts, storage
from puzzle.io.artifacts import Manifest

log = logging.getLogger(__name__)

# Phase -> directory under the output root.
PHASE_DIRS = {
    "convert": "child",
    "data": "tokens",
    "library": "library",
    "bld": "bld",
    "scores": "scores",
    "costs": "costs",
    "search": "solutions",
    "realize": "realized",
    "gkd": "distilled",
    "evaluate": "evaluation",
    "export": "export",
}
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


def auto_device(device: str) -> str | None:
    """The config's ``auto`` as None (each phase then picks CUDA when available, else CPU)."""
    return None if device == "auto" else device


def _invalidate(uri: str) -> None:
    """Drop an artifact's manifest so that its phase rebuilds it (its staging, with any
    checkpoints, is kept)."""
    path = storage.join(uri, artifacts.MANIFEST)
    if not storage.exists(path):
        return
    if storage.is_s3(path):
        bucket, key = storage.split_s3(path)
        storage.s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        from pathlib import Path

        Path(path).unlink()


class Runner:
    """Runs the phases of one configuration; every phase is a method named for it."""

    def __init__(self, config: RunConfig, *, on_phase: Callable[[PhaseRecord], None] | None = None) -> None:
        self.config = config
        self.on_phase = on_phase
        self.result = RunResult(config)
        self._rebuilt: set[str] = set()

    def uri(self, *parts: str) -> str:
        return storage.join(self.config.output, *parts)

    # ------------------------------------------------------------------ bookkeeping

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

    # ------------------------------------------------------------------ phases

    def convert(self) -> str:
        from puzzle.parent import convert

        out = self.uri(PHASE_DIRS["convert"])
        self.step("convert", out, [], lambda: convert(self.config.parent, out))
        return out

    def data(self, child: str) -> str:
        from puzzle.data import prepare

        d = self.config.data
        out = self.uri(PHASE_DIRS["data"])
        self.step(
            "data",
            out,
            ["convert"],
            lambda: prepare(d.source, child, out, seq_len=d.seq_len, splits=dict(d.splits), seed=d.seed),
        )
        return out

    def library(self, child: str, tokens: str) -> str:
        from puzzle.library.variants import SearchSpace, build_library

        s = self.config.search_space
        space = SearchSpace(
            attention_kv_heads=tuple(s.kv_heads) if s.kv_heads is not None else None,
            attention_linear=s.attention_linear,
            attention_noop=s.attention_noop,
            ffn_fractions=tuple(s.ffn_fractions),
            ffn_linear=s.ffn_linear,
            ffn_noop=s.ffn_noop,
        )
        out = self.uri(PHASE_DIRS["library"])
        self.step(
            "library",
            out,
            ["convert", "data"],
            lambda: build_library(
                child,
                tokens,
                out,
                space=space,
                batch_size=self.config.bld.batch_size,
                seed=self.config.bld.seed,
                device=auto_device(self.config.bld.device),
            ),
        )
        return out

    def bld(self, library: str, child: str, tokens: str) -> str:
        from puzzle.library import bld

        b = self.config.bld
        out = self.uri(PHASE_DIRS["bld"])
        settings = dict(
            token_budget=b.token_budget,
            batch_size=b.batch_size,
            lr=b.lr,
            warmup_fraction=b.warmup_fraction,
            seed=b.seed,
            device=auto_device(b.device),
        )
        if b.shards == 1:
            self.step(
                "bld",
                out,
                ["library", "convert", "data"],
                lambda: bld.train(library, child, tokens, out, **settings),
            )
            return out
        shard_uris = []
        for i in range(b.shards):
            shard_out = self.uri("bld-shards", f"shard-{i}-of-{b.shards}")
            self.step(
                f"bld-shard-{i}",
                shard_out,
                ["library", "convert", "data"],
                lambda s=shard_out, i=i: bld.train(
                    library, child, tokens, s, shard=f"{i}/{b.shards}", **settings
                ),
            )
            shard_uris.append(shard_out)
        self.step("bld", out, [f"bld-shard-{i}" for i in range(b.shards)], lambda: bld.merge(shard_uris, out))
        return out

    def scores(self, library: str, child: str, tokens: str) -> str:
        from puzzle.library import scoring

        sc = self.config.scoring
        out = self.uri(PHASE_DIRS["scores"])
        settings = dict(
            metrics=list(sc.metrics), split=sc.split, batch_size=sc.batch_size, device=auto_device(sc.device)
        )
        deps = ["bld", "convert", "data"]
        if sc.shards == 1:
            self.step("scores", out, deps, lambda: scoring.score(library, child, tokens, out, **settings))
            return out
        shard_uris = []
        for i in range(sc.shards):
            shard_out = self.uri("scores-shards", f"shard-{i}-of-{sc.shards}")
            self.step(
                f"scores-shard-{i}",
                shard_out,
                deps,
                lambda s=shard_out, i=i: scoring.score(
                    library, child, tokens, s, shard=f"{i}/{sc.shards}", **settings
                ),
            )
            shard_uris.append(shard_out)
        self.step(
            "scores",
            out,
            [f"scores-shard-{i}" for i in range(sc.shards)],
            lambda: scoring.merge(shard_uris, out),
        )
        return out

    def costs(self, library: str, child: str) -> str:
        from puzzle.search import costs

        c = self.config.costs
        out = self.uri(PHASE_DIRS["costs"])
        self.step(
            "costs",
            out,
            ["library", "convert"],
            lambda: costs.measure(
                library,
                child,
                out,
                batch_sizes=list(c.batch_sizes),
                prompt_len=c.prompt_len,
                gen_len=c.gen_len,
                device=auto_device(c.device),
                dtype=None if c.dtype == "auto" else c.dtype,
                repeats=c.repeats,
            ),
        )
        return out

    def search(self, scores: str, costs: str) -> str:
        from puzzle.search import mip as search

        s = self.config.search
        out = self.uri(PHASE_DIRS["search"])
        self.step(
            "search",
            out,
            ["scores", "costs"],
            lambda: search.search(
                scores,
                costs,
                out,
                objective=s.objective,
                constraints=list(s.constraints),
                num_solutions=s.num_solutions,
                diversity_alpha=s.alpha,
                time_limit=s.time_limit_s,
            ),
        )
        return out

    def baseline(self, method: str, scores: str, costs: str, library: str) -> str:
        from puzzle.search import baselines

        s = self.config.search
        out = self.uri("baselines", method, "solutions")
        self.step(
            f"baseline-{method}",
            out,
            ["scores", "costs", "bld"],
            lambda: baselines.baseline(
                method,
                scores,
                costs,
                out,
                library=library,
                objective=s.objective,
                constraints=list(s.constraints),
            ),
        )
        return out

    def realize(
        self, library: str, solutions: str, child: str, *, phase: str, out: str, deps: list[str]
    ) -> str:
        from puzzle.child.realize import realize

        self.step(
            phase, out, deps, lambda: realize(library, solutions, out, solution_index=0, parent_child=child)
        )
        return out

    def gkd(self, realized: str, child: str, tokens: str, *, phase: str, out: str, deps: list[str]) -> str:
        from puzzle.child.gkd import distill

        g = self.config.gkd
        self.step(
            phase,
            out,
            deps,
            lambda: distill(
                realized,
                child,
                tokens,
                out,
                token_budget=g.token_budget,
                batch_size=g.batch_size,
                lr=g.lr,
                warmup_fraction=g.warmup_fraction,
                weight_cosine=g.weight_cosine,
                weight_kl=g.weight_kl,
                weight_lm=g.weight_lm,
                checkpoint_every=g.checkpoint_every,
                seed=g.seed,
                grad_checkpointing=g.grad_checkpointing,
                device=g.device,
            ),
        )
        return out

    def evaluate(
        self,
        children: dict[str, str],
        details: dict[str, dict[str, Any]],
        child: str,
        tokens: str,
        deps: list[str],
    ) -> str:
        from puzzle.child.evaluate import evaluate

        e = self.config.evaluate
        out = self.uri(PHASE_DIRS["evaluate"])
        self.step(
            "evaluate",
            out,
            deps,
            lambda: evaluate(
                children,
                child,
                tokens,
                out,
                split=e.split,
                batch_size=e.batch_size,
                workload={
                    "batch_size": e.workload.batch_size,
                    "prompt_len": e.workload.prompt_len,
                    "gen_len": e.workload.gen_len,
                },
                device=e.device,
                repeats=e.repeats,
                lm_eval_tasks=list(e.lm_eval_tasks),
                details=details,
                primary=PUZZLE_CHILD,
            ),
        )
        return out

    def export(self, distilled: str) -> str:
        from puzzle.child.export import export

        out = self.uri(PHASE_DIRS["export"])
        dtype = None if self.config.export.dtype == "auto" else self.config.export.dtype
        self.step("export", out, ["gkd"], lambda: export(distilled, out, dtype=dtype))
        return out

    def register(self, export_uri: str, evaluation: str, run: Any) -> None:
        from puzzle.mlflow import registry

        reg = self.config.registry
        if reg.model_name is None:
            return
        figures = registry.figures_from_evaluation(evaluation)
        lineage = registry.Lineage(
            parent_uri=self.config.parent,
            constraints=list(self.config.search.constraints),
            accuracy_kept=figures.get("accuracy_kept"),
            speedup=figures.get("speedup"),
            pipeline_run_id=getattr(run, "run_id", None),
        )
        self.result.registration = registry.register_child(
            export_uri,
            reg.model_name,
            lineage,
            experiment=self.config.tracking.experiment,
            tracking_uri=_tracking_uri(self.config),
        )
        self.result.gate = registry.promote(
            reg.model_name,
            self.result.registration.version,
            min_accuracy_kept=reg.gates.min_accuracy_kept,
            min_speedup=reg.gates.min_speedup,
            tracking_uri=_tracking_uri(self.config),
        )

    # ------------------------------------------------------------------ the whole run

    def run(self) -> RunResult:
        from puzzle.mlflow import tracking

        cfg = self.config
        with tracking.pipeline_run(cfg, name=f"puzzle-{cfg.digest}") as run:
            child = self.convert()
            tokens = self.data(child)
            library = self.library(child, tokens)
            trained = self.bld(library, child, tokens)
            scores = self.scores(trained, child, tokens)
            costs = self.costs(trained, child)
            solutions = self.search(scores, costs)
            realized = self.realize(
                trained,
                solutions,
                child,
                phase="realize",
                out=self.uri(PHASE_DIRS["realize"]),
                deps=["search", "bld", "convert"],
            )
            distilled = self.gkd(
                realized,
                child,
                tokens,
                phase="gkd",
                out=self.uri(PHASE_DIRS["gkd"]),
                deps=["realize", "convert", "data"],
            )
            children = {PUZZLE_CHILD: distilled}
            details: dict[str, dict[str, Any]] = {PUZZLE_CHILD: {"role": "child", "method": "puzzle"}}
            deps = ["gkd", "convert", "data"]
            for method in cfg.baselines.methods:
                sol = self.baseline(method, scores, costs, trained)
                real = self.realize(
                    trained,
                    sol,
                    child,
                    phase=f"baseline-{method}-realize",
                    out=self.uri("baselines", method, "realized"),
                    deps=[f"baseline-{method}", "bld", "convert"],
                )
                final, last = real, f"baseline-{method}-realize"
                if cfg.baselines.gkd:
                    final = self.gkd(
                        real,
                        child,
                        tokens,
                        phase=f"baseline-{method}-gkd",
                        out=self.uri("baselines", method, "distilled"),
                        deps=[last, "convert", "data"],
                    )
                    last = f"baseline-{method}-gkd"
                children[method] = final
                details[method] = {"role": "baseline", "method": method}
                deps.append(last)
            evaluation = self.evaluate(children, details, child, tokens, deps)
            export_uri = self.export(distilled)
            self.register(export_uri, evaluation, run)
        return self.result


def _tracking_uri(config: RunConfig) -> str | None:
    from puzzle.mlflow import tracking

    return tracking.resolve_tracking_uri(config.tracking.uri, config.output)


def run(
    config: RunConfig, *, on_phase: Callable[[PhaseRecord], None] | None = None, check_access: bool = True
) -> RunResult:
    """Run every phase of ``config`` (skipping those already done); see the module docstring."""
    config.check()
    if check_access:
        check_storage(config)
    return Runner(config, on_phase=on_phase).run()
