"""The promote component moves ``champion`` only to a version whose tags meet the targets."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from components.promote.component import promote

pytestmark = pytest.mark.integration


def test_promote_checks_the_version_tags(tiny_export: Path, tracking_server) -> None:
    from mlflow import MlflowClient

    from puzzle.mlflow import registry

    name = f"unit-{uuid.uuid4().hex[:8]}"
    lineage = registry.Lineage(parent_uri="s3://p/q", accuracy_kept=0.93, speedup=1.4)
    version = registry.register_child(str(tiny_export), name, lineage, tracking_uri=tracking_server).version
    client = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server)

    # Even if a stale gate let it through, a version below target does not become champion.
    assert (
        promote.python_func(
            model_name=name,
            version=version,
            min_accuracy_kept=0.95,
            min_speedup=1.3,
            tracking_uri=tracking_server,
        )
        is False
    )
    assert "champion" not in client.get_model_version(name, version).aliases
    assert (
        promote.python_func(
            model_name=name,
            version=version,
            min_accuracy_kept=0.9,
            min_speedup=1.3,
            tracking_uri=tracking_server,
        )
        is True
    )
    assert "champion" in client.get_model_version(name, version).aliases
