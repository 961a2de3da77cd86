"""One run of the local backend: ``python -m pipelines.trigger.local_job JOB.json``.

``puzzle run`` on the request's config, then the child's registration (alias ``candidate``,
lineage tags), the gate (``champion`` when the targets are met), and the outcome written back
on the parent version: ``puzzle.state`` (running -> succeeded | failed), ``puzzle.child``
(``models:/CHILD/VERSION``) or ``puzzle.error``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.trigger.settings import TAG_CHILD, TAG_ERROR, TAG_RUN_ID, TAG_STATE

log = logging.getLogger("pipelines.trigger.local_job")


def find_artifacts(root: Path, kind: str) -> list[Path]:
    """Artifact directories of ``kind`` under ``root``, newest first."""
    found = []
    for manifest in root.rglob("manifest.json"):
        try:
            data = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("kind") == kind:
            found.append((float(data.get("created_at", 0.0)), manifest.parent))
    return [path for _, path in sorted(found, reverse=True)]


def _select_evaluation(candidates: list[Path], export: Path) -> Path | None:
    """The evaluation of the exported child (a run also evaluates baselines)."""
    export_manifest = json.loads((export / "manifest.json").read_text())
    child_uri = export_manifest.get("inputs", {}).get("child", {}).get("uri")
    for path in candidates:
        inputs = json.loads((path / "manifest.json").read_text()).get("inputs", {})
        if child_uri and any(ref.get("uri") == child_uri for ref in inputs.values()):
            return path
    return candidates[0] if candidates else None


def run_job(job: dict[str, Any]) -> str:
    """Run the job; returns the registered child's ``models:/`` URI."""
    from puzzle import registry
    from puzzle.cli import main as puzzle_main
    from puzzle.config import load_config

    config = load_config(job["config"], check_access=False)
    code = puzzle_main(["run", "--config", job["config"]])
    if code != 0:
        raise RuntimeError(f"puzzle run exited with code {code}; see job.log")
    output = Path(config.output)
    exports = find_artifacts(output, "export")
    if not exports:
        raise RuntimeError(f"puzzle run finished without an exported child under {output}")
    export = exports[0]
    evaluation = _select_evaluation(find_artifacts(output, "evaluation"), export)
    figures = registry.figures_from_evaluation(str(evaluation)) if evaluation else {}
    lineage = registry.Lineage(
        parent_uri=job["parent_uri"],
        constraints=list(config.search.constraints),
        accuracy_kept=figures.get("accuracy_kept"),
        speedup=figures.get("speedup"),
        pipeline_run_id=_pipeline_run_id(job, config.tracking.experiment),
        kfp_run_id=job["run_id"],
        profile=job["profile"],
    )
    registration = registry.register_child(
        str(export), job["child_model"], lineage, tracking_uri=job["tracking_uri"], experiment=config.tracking.experiment
    )
    gates = config.registry.gates
    registry.promote(
        registration.name,
        registration.version,
        min_accuracy_kept=gates.min_accuracy_kept,
        min_speedup=gates.min_speedup,
        tracking_uri=job["tracking_uri"],
    )
    return registration.uri


def _pipeline_run_id(job: dict[str, Any], experiment: str) -> str | None:
    """The MLflow run ``puzzle run`` logged to (tagged with this job's run id), if any."""
    from puzzle import tracking

    client = tracking.client_for(job["tracking_uri"])
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    run = tracking.find_kfp_run(client, exp.experiment_id, job["run_id"])
    return run.info.run_id if run else None


def main(argv: list[str] | None = None) -> int:
    from puzzle import tracking

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipelines.trigger.local_job JOB.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(args[0]).read_text())
    client = tracking.client_for(job["tracking_uri"])

    def tag(key: str, value: str) -> None:
        client.set_model_version_tag(job["model"], job["version"], key, value)

    # The service tags the version "submitted" right after starting this process; wait for it, so
    # that "running" is never overwritten by that earlier state.
    deadline = time.time() + 60
    while client.get_model_version(job["model"], job["version"]).tags.get(TAG_RUN_ID) != job["run_id"] and time.time() < deadline:
        time.sleep(0.5)
    tag(TAG_STATE, "running")
    try:
        child_uri = run_job(job)
    except BaseException as exc:
        log.exception("run %s failed", job["run_id"])
        tag(TAG_ERROR, f"{type(exc).__name__}: {exc}"[:500])
        tag(TAG_STATE, "failed")
        return 1
    tag(TAG_CHILD, child_uri)
    tag(TAG_STATE, "succeeded")
    log.info("run %s succeeded: %s", job["run_id"], child_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
