"""Model Registry: exported children registered with lineage, deduplicated, promoted by the gate."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from puzzle.config import ExportConfig
from puzzle.mlflow import registry


def test_models_uri_and_lineage_tags() -> None:
    assert registry.parse_models_uri("models:/llama-parent/3") == ("llama-parent", "3", None)
    assert registry.parse_models_uri("models:/llama-parent@champion") == ("llama-parent", None, "champion")
    assert registry.parse_models_uri("s3://bucket/parent") is None
    tags = registry.Lineage(
        parent_uri="models:/p/7",
        constraints=["throughput>=1.5x"],
        accuracy_kept=0.9712345,
        speedup=1.5,
        kfp_run_id="r1",
    ).tags()
    assert tags[registry.TAG_PARENT_MODEL] == "p" and tags[registry.TAG_PARENT_VERSION] == "7"
    assert json.loads(tags[registry.TAG_CONSTRAINTS]) == ["throughput>=1.5x"]
    assert tags[registry.TAG_ACCURACY_KEPT] == "0.9712345" and tags[registry.TAG_SPEEDUP] == "1.5"
    assert registry.TAG_PIPELINE_RUN not in tags


def test_registration_needs_a_tracking_uri(monkeypatch, tiny_export: str) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(registry.RegistryError, match="MLFLOW_TRACKING_URI"):
        registry.register_child(tiny_export, "m", registry.Lineage(parent_uri="p"))


@pytest.fixture(scope="module")
def tiny_export(tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from puzzle.child.export import export

    out = tmp_path_factory.mktemp("export") / "child"
    export(str(tiny_parent), str(out), ExportConfig())
    return str(out)


@pytest.mark.integration
def test_register_child_with_lineage_once_and_servable_from_the_registry(
    mlflow_server, s3_server, s3_bucket: str, tiny_parent: Path, tmp_path: Path, monkeypatch
) -> None:
    import torch
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from puzzle.child.export import export
    from puzzle.modeling.checkpoints import load_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    export_uri = f"s3://{s3_bucket}/exports/child"
    export(str(tiny_parent), export_uri, ExportConfig())
    name = f"tiny-child-{uuid.uuid4().hex[:6]}"
    lineage = registry.Lineage(
        parent_uri="models:/tiny-parent/4",
        constraints=["throughput>=1.5x"],
        accuracy_kept=0.97,
        speedup=1.6,
        pipeline_run_id="run-1",
        kfp_run_id="kfp-1",
        profile="tiny",
    )
    first = registry.register_child(export_uri, name, lineage)
    assert first.created and first.version == "1"
    again = registry.register_child(export_uri, name, lineage)
    assert (again.created, again.version) == (False, "1")

    client = MlflowClient(mlflow_server.url)
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1
    mv = client.get_model_version(name, versions[0].version)
    assert mv.aliases == ["candidate"]
    assert mv.tags[registry.TAG_PARENT_URI] == "models:/tiny-parent/4"
    assert mv.tags[registry.TAG_PARENT_MODEL] == "tiny-parent" and mv.tags[registry.TAG_PARENT_VERSION] == "4"
    assert json.loads(mv.tags[registry.TAG_CONSTRAINTS]) == ["throughput>=1.5x"]
    assert float(mv.tags[registry.TAG_ACCURACY_KEPT]) == pytest.approx(0.97)
    assert float(mv.tags[registry.TAG_SPEEDUP]) == pytest.approx(1.6)
    assert mv.tags[registry.TAG_PIPELINE_RUN] == "run-1" and mv.tags[registry.TAG_KFP_RUN_ID] == "kfp-1"
    assert len(mv.tags[registry.TAG_CONTENT_HASH]) == 64

    # The registered files are the checkpoint itself: plain transformers loads it from models:/.
    local = registry.download(f"models:/{name}@candidate", tmp_path / "dl")
    assert (local / "config.json").is_file() and (local / "EXPORT_REPORT.md").is_file()
    served = AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        expected = load_model(str(tiny_parent)).eval()(ids).logits
        assert torch.allclose(served(ids).logits, expected, atol=1e-5)
    # ...and the bytes live in the S3 bucket behind the MLflow server's artifact proxy.
    keys = [
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket=mlflow_server.bucket, MaxKeys=1000)["Contents"]
    ]
    assert any(k.endswith("/checkpoint/config.json") and mv.run_id in k for k in keys)


@pytest.mark.integration
def test_gate_moves_champion_only_when_targets_are_met(
    mlflow_server, tiny_parent: Path, tiny_export: str, tmp_path: Path, monkeypatch
) -> None:
    from puzzle.child.export import export

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    name = f"gated-{uuid.uuid4().hex[:6]}"
    gates = {"min_accuracy_kept": 0.9, "min_speedup": 1.3}

    weak = registry.register_child(
        tiny_export, name, registry.Lineage(parent_uri="models:/p/1", accuracy_kept=0.85, speedup=1.6)
    )
    result = registry.promote(name, weak.version, **gates)
    assert not result.passed and result.reasons == ["accuracy kept 0.85 < target 0.9"]
    assert registry.aliases(name, weak.version) == ["candidate"]

    # A different child (bfloat16 export: other content) that meets both targets.
    strong_uri = str(tmp_path / "bf16")
    export(str(tiny_parent), strong_uri, ExportConfig(dtype="bfloat16"))
    strong = registry.register_child(
        strong_uri, name, registry.Lineage(parent_uri="models:/p/1", accuracy_kept=0.95, speedup=1.45)
    )
    assert strong.created and strong.version != weak.version
    assert registry.promote(name, strong.version, **gates).passed
    assert registry.aliases(name, strong.version) == ["candidate", "champion"]
    assert registry.aliases(name, weak.version) == []

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    assert client.get_model_version(name, weak.version).tags[registry.TAG_GATE] == "failed"
    assert client.get_model_version(name, strong.version).tags[registry.TAG_GATE] == "passed"
    # A version without evaluation figures never passes.
    bare = registry.register_child(str(tmp_path / "bf16"), f"{name}-bare", registry.Lineage(parent_uri="p"))
    assert not registry.promote(f"{name}-bare", bare.version, **gates).passed
    assert registry.aliases(f"{name}-bare", bare.version) == ["candidate"]
