"""MLflow tracking of Puzzle runs: one MLflow run per Puzzle run, one nested run per phase.

Nothing is logged (and mlflow is not even imported) unless a tracking URI is known: the
``MLFLOW_TRACKING_URI`` variable, or the config's ``tracking.uri`` (``run-dir`` means a SQLite
store under the run's local output root). The environment wins, so that a cluster's MLflow
secret applies to every run without editing configs.

Usage (the CLI runner; a KFP component does the same with its phase)::

    with tracking.pipeline_run(config, name="puzzle-smollm2") as run:
        manifest = scoring.score(...)
        tracking.log_phase("scores", scores_uri, manifest)

A Kubeflow run spreads its phases over many processes: every component opens
``pipeline_run(..., kfp_run_id=...)`` (or sets ``KFP_RUN_ID``), which *attaches* to the MLflow run
tagged with that KFP run id (creating it the first time) and leaves it open; the pipeline's exit
handler closes it with :func:`finish_pipeline_run`. Logging a phase twice (a retried or cached
step) is a no-op: nested runs are matched by the artifact's content hash.

What each artifact kind logs (files per ``docs/ARCHITECTURE.md``):

* ``scores``: the score table (``mlflow.log_table``, ``tables/scores.json``) and the heatmap;
* ``costs``: the cost table per hardware target, with the hardware identity and the workload
  (batch sizes, sequence lengths) as params;
* ``solutions``: every solution (choices, objective, constraint totals) as a table, the Pareto
  table and plot when present;
* any artifact with a training history (GKD's ``child``): the loss curves as step metrics;
* ``evaluation``: ``metrics.json`` as metrics (also on the pipeline run, for run comparison) and
  the reports;
* every kind: the manifest, its parameters as params, its summary figures as metrics, and its
  small report files under ``files/`` (JSON, CSV, Markdown, HTML, plots such as ``heatmap.png``
  and ``pareto.png``; never weights or tokenizer files).
"""

from __future__ import annotations

import contextvars
import csv
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError
from puzzle.io import artifacts, storage

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
KFP_RUN_ID_ENVS = ("KFP_RUN_ID", "PUZZLE_KFP_RUN_ID")
RUN_DIR = "run-dir"
DEFAULT_EXPERIMENT = "puzzle"

TAG_KFP_RUN_ID = "puzzle.kfp_run_id"
TAG_KIND = "puzzle.kind"
TAG_PHASE = "puzzle.phase"
TAG_ARTIFACT_URI = "puzzle.artifact_uri"
TAG_CONTENT_HASH = "puzzle.content_hash"
TAG_CONFIG_DIGEST = "puzzle.config_digest"
TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"

# Files small enough to be worth logging next to the run (reports, tables, plots), by suffix.
REPORT_SUFFIXES = (".json", ".jsonl", ".csv", ".md", ".html", ".png", ".svg", ".txt", ".yaml")
MAX_REPORT_BYTES = 2 * 1024 * 1024
# Tokenizer files are large JSON that nobody reads in the MLflow UI.
SKIPPED_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens", "chat_template")
# Training histories (written by the GKD phase): JSON lists or JSON-lines of {step, loss, ...}.
HISTORY_NAMES = (
    "history.json",
    "history.jsonl",
    "gkd_history.json",
    "gkd_history.jsonl",
    "train_history.jsonl",
)

_MAX_PARAM_CHARS = 6000
_BATCH = 900


class TrackingError(PuzzleError, RuntimeError):
    """Tracking is misconfigured (e.g. ``tracking.uri: run-dir`` with an ``s3://`` output)."""


def resolve_tracking_uri(
    config_uri: str | None = None, output: str | None = None, *, override: str | None = None
) -> str | None:
    """The tracking URI to use, or None (tracking off).

    ``override`` (an explicit argument) wins, then ``MLFLOW_TRACKING_URI``, then ``config_uri``
    (the config's ``tracking.uri``); ``run-dir`` means ``sqlite:///<output>/mlflow.db``.
    """
    chosen = override or os.environ.get(TRACKING_URI_ENV) or config_uri
    if not chosen:
        return None
    if chosen == RUN_DIR:
        if not output:
            raise TrackingError("tracking.uri 'run-dir' needs the run's output root; pass output=")
        if storage.is_s3(output):
            raise TrackingError(
                f"tracking.uri 'run-dir' keeps a SQLite store under the output root, but output {output!r} "
                "is on "
                "S3: set tracking.uri to an MLflow server (http://host:5000) or MLFLOW_TRACKING_URI"
            )
        root = Path(output).resolve()
        root.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{root / 'mlflow.db'}"
    return chosen


def kfp_run_id_from_env() -> str | None:
    for name in KFP_RUN_ID_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    return None


# --------------------------------------------------------------------------- values


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def _number(value: Any) -> float | None:
    """A finite float for metric values (bools and non-numbers are not metrics)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./ ")


def _metric_key(name: str) -> str:
    """A metric, param or tag key MLflow accepts (other characters become ``_``)."""
    return "".join(c if c in _KEY_CHARS else "_" for c in name)[:250]


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _rows_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Rows of (possibly nested) dicts -> columns for ``log_table`` (nested keys flattened)."""
    flat = [flatten(r) for r in rows]
    columns: list[str] = []
    for row in flat:
        columns.extend(k for k in row if k not in columns)
    return {c: [_cell(row.get(c)) for row in flat] for c in columns}


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    """A CSV file's rows, with numeric cells as numbers."""

    def parse(cell: str) -> Any:
        try:
            return int(cell)
        except ValueError:
            pass
        try:
            return float(cell)
        except ValueError:
            return cell

    with path.open(newline="") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _row_list(data: Any, preferred: tuple[str, ...]) -> list[dict[str, Any]]:
    """The list of row dicts in a JSON document: the document itself, a preferred key, or the
    first list of dicts found (a dict of dicts becomes rows with a ``name`` column)."""
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if not isinstance(data, dict):
        return []
    keys = [k for k in preferred if k in data] + [k for k in data if k not in preferred]
    for key in keys:
        value = data[key]
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            return value
    for key in keys:
        value = data[key]
        if isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
            return [{"name": name, **row} for name, row in value.items()]
    return []


# --------------------------------------------------------------------------- the run


@dataclass
class PipelineRun:
    """An open MLflow run of one Puzzle run (or one KFP pipeline run)."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str
    kfp_run_id: str | None = None
    phase_runs: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    # ------------------------------------------------------------------ low level

    def log_params(self, params: Mapping[str, Any], run_id: str | None = None) -> None:
        """Log params (flattened); a param already logged with another value is kept, with a warning."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        target = run_id or self.run_id
        items = [Param(_metric_key(k), _param_value(v)) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            batch = items[start : start + 100]
            try:
                self.client.log_batch(target, params=batch)
            except MlflowException as exc:
                # Params are immutable in MLflow; a re-attached run may already hold other values.
                log.warning(
                    "some params were already logged with other values on run %s: %s", target, exc.message
                )
                existing = self.client.get_run(target).data.params
                fresh = [p for p in batch if p.key not in existing]
                if fresh:
                    self.client.log_batch(target, params=fresh)

    def log_metrics(self, metrics: Mapping[str, Any], *, step: int = 0, run_id: str | None = None) -> int:
        """Log the numeric entries of ``metrics`` (flattened); returns how many were logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in flatten(metrics).items():
            number = _number(value)
            if number is not None:
                items.append(Metric(_metric_key(key), number, now, int(step)))
        self._log_metric_batch(items, run_id)
        return len(items)

    def log_metrics_history(
        self,
        records: Iterable[Mapping[str, Any]],
        *,
        prefix: str = "",
        step_key: str = "step",
        run_id: str | None = None,
    ) -> int:
        """Log a training history (one dict per step) as step metrics; returns the step count."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        steps = 0
        for index, record in enumerate(records):
            step = record.get(step_key, index)
            steps += 1
            for key, value in flatten(record).items():
                number = _number(value)
                if key == step_key or number is None:
                    continue
                items.append(Metric(_metric_key(f"{prefix}{key}"), number, now, int(step)))
        self._log_metric_batch(items, run_id)
        return steps

    def _log_metric_batch(self, items: list[Any], run_id: str | None) -> None:
        target = run_id or self.run_id
        for start in range(0, len(items), _BATCH):
            self.client.log_batch(target, metrics=items[start : start + _BATCH])

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(run_id or self.run_id, _metric_key(key), _param_value(value))

    def log_table(
        self, rows: Sequence[Mapping[str, Any]], artifact_file: str, run_id: str | None = None
    ) -> None:
        if rows:
            self.client.log_table(run_id or self.run_id, data=_rows_table(rows), artifact_file=artifact_file)

    # ------------------------------------------------------------------ phases

    def log_phase(
        self,
        kind: str,
        artifact_uri: str,
        manifest: artifacts.Manifest | None = None,
        *,
        name: str | None = None,
    ) -> str:
        """Log one phase's artifact as a nested run; returns the nested run's id.

        Idempotent: a phase whose artifact (same content hash) is already logged under this
        pipeline run is not logged again.
        """
        manifest = manifest or artifacts.require_manifest(artifact_uri, kind)
        content_hash = manifest.content_hash
        existing = self._find_phase_run(content_hash)
        if existing is not None:
            log.info("tracking: %s at %s already logged (run %s)", kind, artifact_uri, existing)
            return existing
        run = self.client.create_run(
            self.experiment_id,
            run_name=name or kind,
            tags={
                TAG_PARENT_RUN: self.run_id,
                TAG_KIND: manifest.kind,
                TAG_PHASE: name or kind,
                TAG_ARTIFACT_URI: artifact_uri,
                TAG_CONTENT_HASH: content_hash,
                **({TAG_KFP_RUN_ID: self.kfp_run_id} if self.kfp_run_id else {}),
            },
        )
        phase_run = run.info.run_id
        status = "FINISHED"
        try:
            with _local_report_files(artifact_uri, manifest) as local:
                self.log_params(manifest.parameters, run_id=phase_run)
                self.log_metrics(manifest.summary, run_id=phase_run)
                self.client.log_dict(phase_run, manifest.to_json(), "manifest.json")
                for rel in sorted(p for p in local.rglob("*") if p.is_file()):
                    sub = str(rel.relative_to(local).parent)
                    self.client.log_artifact(
                        phase_run, str(rel), artifact_path=f"files/{sub}" if sub != "." else "files"
                    )
                _log_kind(self, manifest.kind, local, phase_run)
                history = _find_history(local)
                if history is not None:
                    steps = self.log_metrics_history(
                        history, prefix=f"{_history_prefix(manifest.kind)}/", run_id=phase_run
                    )
                    log.info("tracking: logged %d steps of training history from %s", steps, artifact_uri)
        except Exception:
            status = "FAILED"
            raise
        finally:
            self.client.set_terminated(phase_run, status=status)
        self.phase_runs[name or kind] = phase_run
        log.info("tracking: logged %s phase %s to run %s", manifest.kind, artifact_uri, phase_run)
        return phase_run

    def _find_phase_run(self, content_hash: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_PARENT_RUN}` = '{self.run_id}' and tags.`{TAG_CONTENT_HASH}` = "
            f"'{content_hash}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None


def _history_prefix(kind: str) -> str:
    return "gkd" if kind == "child" else kind


@contextmanager
def _local_report_files(artifact_uri: str, manifest: artifacts.Manifest) -> Iterator[Path]:
    """A local directory holding the artifact's small report files (downloaded from S3 if needed)."""
    wanted = [
        rel
        for rel, meta in manifest.files.items()
        if rel.endswith(REPORT_SUFFIXES)
        and int(meta.get("size", 0)) <= MAX_REPORT_BYTES
        and not Path(rel).name.startswith(SKIPPED_PREFIXES)
        and not rel.startswith(".")
    ]
    tmp = Path(tempfile.mkdtemp(prefix="puzzle-tracking-"))
    try:
        for rel in wanted:
            target = tmp / rel
            if storage.is_s3(artifact_uri):
                storage.download_file(storage.join(artifact_uri, rel), target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(artifact_uri) / rel, target)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _find_history(local: Path) -> list[dict[str, Any]] | None:
    """A training history among the artifact's files (GKD writes one), as a list of records."""
    for name in HISTORY_NAMES:
        for path in sorted(local.rglob(name)):
            if path.suffix == ".jsonl":
                records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            else:
                data = json.loads(path.read_text())
                records = _row_list(data, ("history", "steps", "records"))
            records = [r for r in records if isinstance(r, dict)]
            if records:
                return records
    return None


# --------------------------------------------------------------------------- per kind


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _log_scores(run: PipelineRun, local: Path, run_id: str) -> None:
    rows: list[dict[str, Any]] = []
    if (local / "scores.csv").is_file():
        rows = read_csv_rows(local / "scores.csv")
    elif (local / "scores.json").is_file():
        rows = _row_list(_read_json(local / "scores.json"), ("scores", "rows"))
    run.log_table(rows, "tables/scores.json", run_id)
    run.log_metrics({"num_scored_blocks": len(rows)}, run_id=run_id)


HARDWARE_KEYS = ("hardware", "device", "gpu")
WORKLOAD_KEYS = ("workload", "measurement", "settings")


def _log_costs(run: PipelineRun, local: Path, run_id: str) -> None:
    data = _read_json(local / "costs.json")
    if not isinstance(data, dict):
        return
    params: dict[str, Any] = {}
    for key in (*HARDWARE_KEYS, *WORKLOAD_KEYS):
        value = data.get(key)
        if isinstance(value, Mapping):
            params.update(flatten(value, f"{key}."))
        elif value is not None and not isinstance(value, list | dict):
            params[key] = value
    run.log_params(params, run_id=run_id)
    rows = _row_list(data, ("rows", "costs", "entries"))
    hardware_value = data.get("hardware")
    hardware = hardware_value if isinstance(hardware_value, Mapping) else {}
    name = str(hardware.get("device_name") or hardware.get("name") or hardware.get("device") or "target")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    run.log_table(rows, f"tables/costs_{safe}.json", run_id)
    run.log_metrics({"num_cost_entries": len(rows)}, run_id=run_id)


def _solution_row(index: int, solution: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"solution": index}
    for key, value in solution.items():
        if key in ("blocks", "choices", "architecture") and isinstance(value, list):
            row[key] = " | ".join(v if isinstance(v, str) else json.dumps(v, sort_keys=True) for v in value)
        else:
            row[key] = value
    return row


def _log_solutions(run: PipelineRun, local: Path, run_id: str) -> None:
    data = _read_json(local / "solutions.json")
    solutions = _row_list(data, ("solutions",))
    rows = [_solution_row(i, s) for i, s in enumerate(solutions)]
    if isinstance(data, Mapping) and isinstance(data.get("parent"), Mapping):
        # The parent's own architecture, priced the same way: the row every solution compares to.
        rows.append({**_solution_row(-1, data["parent"]), "solution": "parent"})
    run.log_table(rows, "tables/solutions.json", run_id)
    if (local / "pareto.csv").is_file():
        run.log_table(read_csv_rows(local / "pareto.csv"), "tables/pareto.json", run_id)
    run.log_metrics({"num_solutions": len(solutions)}, run_id=run_id)
    if solutions:
        best = solutions[0]
        run.log_metrics({k: v for k, v in flatten(best).items() if _number(v) is not None}, run_id=run_id)


def _log_evaluation(run: PipelineRun, local: Path, run_id: str) -> None:
    metrics = _read_json(local / "metrics.json")
    if isinstance(metrics, Mapping):
        run.log_metrics(metrics, run_id=run_id)
        # Headline figures on the pipeline run too, so runs compare side by side in the UI.
        run.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, Mapping)})
        models = metrics.get("models")
        if isinstance(models, Mapping):
            # One row per evaluated model (parent, child, baselines): the comparison table.
            run.log_table(
                [{"model": name, **row} for name, row in models.items() if isinstance(row, Mapping)],
                "tables/models.json",
                run_id,
            )
    for report in ("report.html", "report.md"):
        if (local / report).is_file():
            run.client.log_artifact(run.run_id, str(local / report), artifact_path="report")


def _log_export(run: PipelineRun, local: Path, run_id: str) -> None:
    report = _read_json(local / "export_report.json")
    if isinstance(report, Mapping):
        engines = {
            e["engine"]: e.get("servable") for e in report.get("engines", []) if isinstance(e, Mapping)
        }
        # "vLLM (nemotron_nas)" -> tag engine.vLLM
        run.set_tags(
            {f"engine.{name.split(' (')[0]}": "servable" if ok else "no" for name, ok in engines.items()},
            run_id=run_id,
        )


_KIND_LOGGERS = {
    "scores": _log_scores,
    "costs": _log_costs,
    "solutions": _log_solutions,
    "evaluation": _log_evaluation,
    "export": _log_export,
}


def _log_kind(run: PipelineRun, kind: str, local: Path, run_id: str) -> None:
    logger = _KIND_LOGGERS.get(kind)
    if logger is not None:
        logger(run, local, run_id)


# --------------------------------------------------------------------------- module API

_ACTIVE: contextvars.ContextVar[PipelineRun | None] = contextvars.ContextVar(
    "puzzle_tracking_run", default=None
)


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise TypeError(f"config must be a mapping or have to_dict(), got {type(config).__name__}")


def client_for(tracking_uri: str) -> Any:
    # MLflow writes "View run ..." to stdout when a run ends; we log the run's URL instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id_for(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing. With a local SQLite store (``run-dir``)
    its artifacts go beside the database, not into ``./mlruns`` of whatever the current folder is."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    uri = str(getattr(client, "tracking_uri", "") or "")
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another component
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def find_kfp_run(client: Any, experiment_id: str, kfp_run_id: str) -> Any | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_KFP_RUN_ID}` = '{kfp_run_id}'",
        max_results=50,
        order_by=["attributes.start_time ASC"],
    )
    top = [r for r in runs if TAG_PARENT_RUN not in r.data.tags]
    return top[0] if top else None


def _settle_kfp_run(client: Any, experiment_id: str, kfp_run_id: str, created: str) -> str:
    """Parallel components of one KFP run may each create its MLflow run; the oldest wins and
    the others delete theirs and attach to it."""
    oldest = find_kfp_run(client, experiment_id, kfp_run_id)
    if oldest is None or oldest.info.run_id == created:
        return created
    client.delete_run(created)
    return oldest.info.run_id


@contextmanager
def pipeline_run(
    config: Any = None,
    name: str = "puzzle",
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    kfp_run_id: str | None = None,
    output: str | None = None,
    tags: Mapping[str, str] | None = None,
    close: bool | None = None,
) -> Iterator[PipelineRun | None]:
    """Open (or, with a KFP run id, attach to) the MLflow run of a Puzzle run.

    ``config`` is the run configuration (a mapping or an object with ``to_dict()``, such as
    :class:`puzzle.config.RunConfig`); its fields become params and its ``tracking`` section
    gives the URI and experiment unless passed here. Yields None when tracking is off. The run
    ends (FINISHED, or FAILED on an exception) when the block exits, unless it belongs to a KFP
    run (``close`` defaults to False then: the pipeline's exit handler ends it).
    """
    data = _config_dict(config)
    section_value = data.get("tracking")
    section = section_value if isinstance(section_value, Mapping) else {}
    uri = resolve_tracking_uri(section.get("uri"), output or data.get("output"), override=tracking_uri)
    if uri is None:
        yield None
        return
    kfp_run_id = kfp_run_id or kfp_run_id_from_env()
    close = kfp_run_id is None if close is None else close
    client = client_for(uri)
    experiment_id = experiment_id_for(client, experiment or section.get("experiment") or DEFAULT_EXPERIMENT)
    existing = find_kfp_run(client, experiment_id, kfp_run_id) if kfp_run_id else None
    if existing is not None:
        run_id = existing.info.run_id
        log.info("tracking: attached to MLflow run %s of KFP run %s", run_id, kfp_run_id)
    else:
        run_tags = {**dict(tags or {}), **({TAG_KFP_RUN_ID: kfp_run_id} if kfp_run_id else {})}
        digest = getattr(config, "digest", None)
        if isinstance(digest, str):
            run_tags[TAG_CONFIG_DIGEST] = digest
        run_id = client.create_run(experiment_id, run_name=name, tags=run_tags).info.run_id
        if kfp_run_id:
            run_id = _settle_kfp_run(client, experiment_id, kfp_run_id, run_id)
    run = PipelineRun(client, run_id, experiment_id, uri, kfp_run_id)
    if existing is None and data:
        run.log_params(data)
    token = _ACTIVE.set(run)
    log.info("tracking: MLflow run %s", run.url)
    try:
        yield run
    except BaseException:
        if close:
            client.set_terminated(run_id, status="FAILED")
        raise
    else:
        if close:
            client.set_terminated(run_id, status="FINISHED")
    finally:
        _ACTIVE.reset(token)


def active_run() -> PipelineRun | None:
    """The pipeline run opened by the innermost :func:`pipeline_run` block, if any."""
    return _ACTIVE.get()


def log_phase(
    kind: str, artifact_uri: str, manifest: artifacts.Manifest | None = None, *, name: str | None = None
) -> str | None:
    """Log a phase's artifact on the active pipeline run; a no-op (None) when tracking is off."""
    run = active_run()
    if run is None:
        return None
    return run.log_phase(kind, artifact_uri, manifest, name=name)


def log_metrics(metrics: Mapping[str, Any], *, step: int = 0) -> None:
    """Log figures on the active pipeline run (no-op when tracking is off)."""
    run = active_run()
    if run is not None:
        run.log_metrics(metrics, step=step)


def log_metrics_history(
    records: Iterable[Mapping[str, Any]], *, prefix: str = "", step_key: str = "step"
) -> None:
    """Log a history (one dict per step) as step metrics on the active pipeline run."""
    run = active_run()
    if run is not None:
        run.log_metrics_history(records, prefix=prefix, step_key=step_key)


def finish_pipeline_run(
    kfp_run_id: str,
    status: str,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> str | None:
    """End the MLflow run of a KFP run with ``status`` (FINISHED, FAILED or KILLED); for the
    pipeline's exit handler. Returns the MLflow run id, or None when there is none."""
    uri = resolve_tracking_uri(override=tracking_uri)
    if uri is None:
        return None
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise TrackingError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    client = client_for(uri)
    experiment_obj = client.get_experiment_by_name(experiment)
    if experiment_obj is None:
        return None
    run = find_kfp_run(client, experiment_obj.experiment_id, kfp_run_id)
    if run is None:
        return None
    client.set_terminated(run.info.run_id, status=status)
    return run.info.run_id
