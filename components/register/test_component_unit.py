"""The register component puts the exported child in the MLflow registry with its lineage, once."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kfp import dsl

from components.conftest import write_evaluation
from components.register.component import register

pytestmark = pytest.mark.integration


def test_register_tags_lineage_and_does_not_duplicate(
    tiny_export: Path, tracking_server, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    name = f"unit-{uuid.uuid4().hex[:8]}"
    evaluation = write_evaluation(tmp_path / "evaluation", accuracy_kept=0.97, speedup=1.6)
    kwargs = dict(
        checkpoint=dsl.Model(name="checkpoint", uri=str(tiny_export), metadata={}),
        evaluation=dsl.Artifact(name="evaluation", uri=str(evaluation), metadata={}),
        model_name=name,
        parent_uri="models:/llama-parent/4",
        constraints=["throughput>=1.5x"],
        profile="fast",
        tracking_uri=tracking_server,
        experiment="unit-register",
        kfp_run_id="run-123",
    )

    model_uri, version = register.python_func(**kwargs)
    again_uri, again = register.python_func(**kwargs)

    assert model_uri == f"models:/{name}/{version}" and (again_uri, again) == (model_uri, version)
    mv = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server).get_model_version(
        name, version
    )
    assert mv.aliases == ["candidate"]
    assert mv.tags["puzzle.parent_model"] == "llama-parent" and mv.tags["puzzle.parent_version"] == "4"
    assert float(mv.tags["puzzle.speedup"]) == pytest.approx(1.6)
    assert mv.tags["puzzle.kfp_run_id"] == "run-123" and mv.tags["puzzle.profile"] == "fast"


def test_register_without_tracking_uri_says_so(tiny_export: Path, tmp_path: Path, monkeypatch) -> None:
    from puzzle.errors import PuzzleError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    evaluation = write_evaluation(tmp_path / "evaluation", accuracy_kept=0.9, speedup=1.2)
    with pytest.raises(PuzzleError, match="MLFLOW_TRACKING_URI"):
        register.python_func(
            checkpoint=dsl.Model(name="checkpoint", uri=str(tiny_export), metadata={}),
            evaluation=dsl.Artifact(name="evaluation", uri=str(evaluation), metadata={}),
            model_name="x",
            parent_uri="s3://p/q",
            constraints=[],
        )
