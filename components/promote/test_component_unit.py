"""The promote component moves ``champion`` only to the export's registered version, when its tags meet
the targets."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kfp import dsl

from components.promote.component import promote

pytestmark = pytest.mark.integration


def test_promote_checks_the_version_tags(tiny_export: Path, tracking_server) -> None:
    from mlflow import MlflowClient

    from puzzle.mlflow import registry

    name = f"unit-{uuid.uuid4().hex[:8]}"
    lineage = registry.Lineage(parent_uri="s3://p/q", accuracy_kept=0.93, speedup=1.4)
    version = registry.register_child(str(tiny_export), name, lineage, tracking_uri=tracking_server).version
    client = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server)
    tracking_config = {"uri": tracking_server}
    export = dsl.Model(name="export", uri=str(tiny_export), metadata={})

    # Even if a stale gate let it through, a version below target does not become champion.
    strict = {"model_name": name, "gates": {"min_accuracy_kept": 0.95, "min_speedup": 1.3}}
    assert (
        promote.python_func(export=export, registry_config=strict, tracking_config=tracking_config) is False
    )
    assert "champion" not in client.get_model_version(name, version).aliases
    met = {"model_name": name, "gates": {"min_accuracy_kept": 0.9, "min_speedup": 1.3}}
    assert promote.python_func(export=export, registry_config=met, tracking_config=tracking_config) is True
    assert "champion" in client.get_model_version(name, version).aliases
