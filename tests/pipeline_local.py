"""The whole Puzzle pipeline under KFP's local runner, on a tiny parent, once per test session.

The parent is read from and the export written to the real SeaweedFS S3 server; tracking and the
registry go to the real MLflow server. ``kfp.local`` runs every component as a subprocess of
this Python (``SubprocessRunner(use_venv=False)``), the BLD and scoring fan-outs with 2 shards
each. kfp.local may report a failed task as a success (kubeflow/pipelines#13332), so tests look
at what each task wrote: :class:`LocalRun` finds a task's folder and its ``executor_output.json``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

TINY_OVERRIDES = [
    "device=cpu",
    "data.seq_len=32",
    "data.splits={calibration: 4, bld: 8, score: 4, gkd: 8, eval: 4}",
    "library.kv_heads=[1]",
    "library.attention_linear=true",
    "library.ffn_fractions=[1.0, 0.5]",
    "library.ffn_linear=false",
    "bld.token_budget=64",
    "bld.batch_size=2",
    "bld.shards=2",
    "scoring.metrics=[kl_div, lm_loss]",
    "scoring.batch_size=4",
    "scoring.shards=2",
    "costs.prompt_len=8",
    "costs.gen_len=4",
    "costs.repeats=1",
    "search.constraints=['parameters<=0.8x']",
    "gkd.token_budget=64",
    "gkd.batch_size=2",
    "evaluate.batch_size=4",
    "evaluate.repeats=1",
    "baselines.methods=[uniform_width]",
    "baselines.gkd=false",
    "registry.gates={min_accuracy_kept: 0.0, min_speedup: 0.0}",
]
MODEL_NAME = "tiny-puzzle-pipeline"
EXPERIMENT = "puzzle-pipeline-local"


@dataclass
class LocalRun:
    """A finished local pipeline run: its arguments and where each task wrote its outputs."""

    root: Path
    arguments: dict[str, Any]
    parent_uri: str
    serving_uri: str
    tracking_uri: str
    error: BaseException | None

    @property
    def run_dir(self) -> Path:
        (run,) = [p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return run

    def task_dirs(self, task: str) -> list[Path]:
        """Every folder of a task (one per loop iteration inside a ParallelFor), in iteration order."""
        found = [p for p in self.run_dir.rglob(task) if p.is_dir() and (p / "executor_output.json").is_file()]
        return sorted(found, key=lambda p: str(p))

    def task_dir(self, task: str) -> Path:
        dirs = self.task_dirs(task)
        assert len(dirs) == 1, f"task {task!r}: expected one run, found {[str(d) for d in dirs]}"
        return dirs[0]

    def executor_output(self, task: str) -> dict[str, Any]:
        return json.loads((self.task_dir(task) / "executor_output.json").read_text())

    def artifact(self, task: str, output: str) -> Path:
        return self.task_dir(task) / output

    def metadata(self, task: str, output: str) -> dict[str, Any]:
        (artifact,) = self.executor_output(task)["artifacts"][output]["artifacts"]
        return artifact.get("metadata", {})

    def registered_version(self) -> str:
        """The registry version of the run's export (found by its content hash, as promote does)."""
        from puzzle.mlflow.registry import registered_version

        name = self.arguments["registry"]["model_name"]
        export = str(self.artifact("export", "export"))
        return registered_version(export, name, tracking_uri=self.tracking_uri)

    def parameter(self, task: str, name: str) -> Any:
        return self.executor_output(task)["parameterValues"][name]


def pretrain_tiny_parent(
    parent: Path, out: Path, *, steps: int = 60, seq_len: int = 32, batch: int = 8
) -> Path:
    """A copy of a tiny random parent trained briefly on standard-library text (60 steps, seconds).

    A random parent predicts almost no next token right, so "accuracy kept" would be undefined
    and the registry gate could not pass; a few dozen steps teach it the easy bytes.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from puzzle.data import iter_documents

    tokenizer = AutoTokenizer.from_pretrained(parent)
    ids: list[int] = []
    for document in iter_documents("stdlib", seed=1):
        ids.extend(tokenizer(document).input_ids)
        if len(ids) >= steps * batch * seq_len:
            break
    data = torch.tensor(ids[: steps * batch * seq_len]).view(steps, batch, seq_len)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        loss = model(input_ids=data[step], labels=data[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    shutil.copytree(parent, out)
    model.eval().save_pretrained(out)
    return out


def upload_dir(local: Path, uri: str) -> None:
    from puzzle.io import storage

    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.upload_file(path, storage.join(uri, str(path.relative_to(local))))


def run_tiny_pipeline(
    root: Path,
    parent_dir: Path,
    bucket: str,
    tracking_uri: str,
    *,
    overrides: list[str] | tuple[str, ...] = (),
) -> LocalRun:
    """Upload ``parent_dir`` to S3 and run the pipeline on it; exceptions are kept, not raised."""
    from kfp import local
    from kfp.local.orchestrator import task_executor

    from pipelines.parameters import pipeline_arguments
    from pipelines.puzzle_pipeline import puzzle_pipeline
    from puzzle.config import load_config

    parent_uri = f"s3://{bucket}/parents/tiny-llama"
    serving_uri = f"s3://{bucket}/serving/tiny-child"
    upload_dir(parent_dir, parent_uri)
    config = load_config(
        None,
        [
            *TINY_OVERRIDES,
            f"parent={parent_uri}",
            f"registry.model_name={MODEL_NAME}",
            f"tracking.uri={tracking_uri}",
            f"tracking.experiment={EXPERIMENT}",
            *overrides,
        ],
        check_access=False,
    )
    arguments = pipeline_arguments(config, serving_uri=serving_uri, profile="tiny")
    pipeline_root = root / "pipeline-root"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        workspace_root=str(root / "workspace"),
        raise_on_error=True,
    )
    error: BaseException | None = None
    # kfp.local honours the GPU steps' retry policy, backoff included (1, 2, 4 min): here a failure
    # should surface at once, so the executor's backoff sleep is skipped (the retries still run).
    no_backoff = SimpleNamespace(sleep=lambda _seconds: None)
    with warnings.catch_warnings(), mock.patch.object(task_executor, "time", no_backoff):
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        warnings.filterwarnings(
            "ignore", message=".*have no effect in the current local runner.*", category=UserWarning
        )
        try:
            puzzle_pipeline(**arguments)
        except Exception as exc:  # noqa: BLE001 - the tests report it with the task logs
            error = exc
    return LocalRun(pipeline_root, arguments, parent_uri, serving_uri, tracking_uri, error)


def session_run(
    tmp_path_factory: Any,
    s3_server: Any,
    mlflow_server: Any,
    tiny_parent_factory: Any,
    overrides: list[str] | tuple[str, ...] = (),
) -> LocalRun:
    """A pipeline run on a briefly trained tiny parent, in a fresh bucket (the session's one run is
    the root conftest's ``local_pipeline_run`` fixture); ``overrides`` go after :data:`TINY_OVERRIDES`."""
    import uuid

    bucket = f"pipeline-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    root = tmp_path_factory.mktemp("pipeline")
    parent = pretrain_tiny_parent(tiny_parent_factory("llama", intermediate_size=192), root / "parent")
    return run_tiny_pipeline(root, parent, bucket, mlflow_server.url, overrides=overrides)
