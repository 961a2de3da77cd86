"""The register component puts the exported child in the MLflow registry with its lineage, once, and
says whether it meets the gates."""

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
        parent_uri="models:/llama-parent/4",
        export=dsl.Model(name="export", uri=str(tiny_export), metadata={}),
        evaluation=dsl.Artifact(name="evaluation", uri=str(evaluation), metadata={}),
        registry_config={"model_name": name, "gates": {"min_accuracy_kept": 0.95, "min_speedup": 1.5}},
        search_config={"constraints": ["throughput>=1.5x"]},
        tracking_config={"uri": tracking_server, "experiment": "unit-register"},
        profile="fast",
        kfp_run_id="run-123",
    )

    from puzzle.mlflow.registry import registered_version

    passed = register.python_func(**kwargs)
    version = registered_version(str(tiny_export), name, tracking_uri=tracking_server)
    again_passed = register.python_func(**kwargs)

    assert registered_version(str(tiny_export), name, tracking_uri=tracking_server) == version  # no duplicate
    assert passed is True and again_passed is True
    client = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server)
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == [version]
    mv = client.get_model_version(name, version)
    assert mv.aliases == ["candidate"]
    assert mv.tags["puzzle.parent_model"] == "llama-parent" and mv.tags["puzzle.parent_version"] == "4"
    assert float(mv.tags["puzzle.speedup"]) == pytest.approx(1.6)
    assert mv.tags["puzzle.kfp_run_id"] == "run-123" and mv.tags["puzzle.profile"] == "fast"


def test_register_says_when_the_gates_are_not_met(tiny_export: Path, tracking_server, tmp_path: Path) -> None:
    name = f"unit-{uuid.uuid4().hex[:8]}"
    evaluation = write_evaluation(tmp_path / "evaluation", accuracy_kept=0.97, speedup=1.1)

    from puzzle.mlflow.registry import registered_version

    passed = register.python_func(
        parent_uri="s3://p/q",
        export=dsl.Model(name="export", uri=str(tiny_export), metadata={}),
        evaluation=dsl.Artifact(name="evaluation", uri=str(evaluation), metadata={}),
        registry_config={"model_name": name, "gates": {"min_accuracy_kept": 0.9, "min_speedup": 1.3}},
        search_config={},
        tracking_config={"uri": tracking_server, "experiment": "unit-register"},
    )

    assert passed is False
    assert registered_version(str(tiny_export), name, tracking_uri=tracking_server)  # registered all the same


def test_without_a_model_name_nothing_is_registered_and_the_gate_is_closed(
    tiny_export: Path, tmp_path: Path
) -> None:
    evaluation = write_evaluation(tmp_path / "evaluation", accuracy_kept=0.97, speedup=1.6)
    assert (
        register.python_func(
            parent_uri="s3://p/q",
            export=dsl.Model(name="export", uri=str(tiny_export), metadata={}),
            evaluation=dsl.Artifact(name="evaluation", uri=str(evaluation), metadata={}),
            registry_config={},
            search_config={},
        )
        is False
    )


def test_register_without_tracking_uri_says_so(tiny_export: Path, tmp_path: Path, monkeypatch) -> None:
    from puzzle.errors import PuzzleError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    evaluation = write_evaluation(tmp_path / "evaluation", accuracy_kept=0.9, speedup=1.2)
    with pytest.raises(PuzzleError, match="MLFLOW_TRACKING_URI"):
        register.python_func(
            parent_uri="s3://p/q",
            export=dsl.Model(name="export", uri=str(tiny_export), metadata={}),
            evaluation=dsl.Artifact(name="evaluation", uri=str(evaluation), metadata={}),
            registry_config={"model_name": "x"},
            search_config={},
        )
