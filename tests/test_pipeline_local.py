"""The whole pipeline under kfp.local on a tiny parent: parent from S3, BLD and scoring on 2 shards
each, one baseline, the child exported to an S3 serving prefix, registered and promoted in MLflow,
the outcome recorded by the exit handler. Every assertion is on what the tasks wrote (a failed local task can
be reported as a success: kubeflow/pipelines#13332)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(local_pipeline_run):
    if local_pipeline_run.error is not None:
        pytest.fail(f"the local pipeline run failed: {local_pipeline_run.error}")
    return local_pipeline_run


def test_parent_is_read_from_s3(run) -> None:
    converted = run.artifact("convert", "parent")
    parent = json.loads((converted / "parent.json").read_text())
    assert parent["reference"] == run.parent_uri
    assert run.metadata("convert", "parent")["num_layers"] == 3


def test_bld_ran_as_two_shards_and_merged(run) -> None:
    shards = run.task_dirs("bld")
    assert len(shards) == 2
    trained = set()
    for shard in shards:
        meta = json.loads((shard / "trained" / "library.json").read_text())
        shard_units = {(layer, name) for layer, e in meta["layers"].items() for name in e["variants"]}
        assert shard_units and not (shard_units & trained), "the two shards must train disjoint variants"
        trained |= shard_units
    merged = json.loads((run.artifact("bld-merge", "trained") / "library.json").read_text())
    merged_trained = {
        (layer, name)
        for layer, e in merged["layers"].items()
        for name, info in e["variants"].items()
        if info.get("trained")
    }
    assert merged_trained == trained
    assert run.metadata("bld-merge", "trained")["merged_shards"] == 2


def test_scores_ran_as_two_shards_and_cover_every_block(run) -> None:
    shard_rows = [
        json.loads((d / "scores" / "scores.json").read_text())["rows"] for d in run.task_dirs("scoring")
    ]
    assert len(shard_rows) == 2 and all(shard_rows)
    merged = json.loads((run.artifact("scoring-merge", "scores") / "scores.json").read_text())["rows"]
    assert sorted((r["layer"], r["block"]) for r in merged) == sorted(
        (r["layer"], r["block"]) for rows in shard_rows for r in rows
    )
    assert {r["layer"] for r in merged} == {0, 1, 2}


def test_search_meets_the_constraint_and_the_child_is_realized(run) -> None:
    from puzzle.child.realize import pick_solution

    _, best = pick_solution(str(run.artifact("search", "solutions")), 0)
    assert len(best) == 3
    realized = json.loads((run.artifact("realize", "child") / "config.json").read_text())
    assert len(realized["block_configs"]) == 3
    # The constraint is parameters <= 0.8x the parent's.
    parent_params = run.metadata("convert", "parent")["num_parameters"]
    assert run.metadata("realize", "child")["num_parameters"] <= 0.8 * parent_params


def test_evaluation_feeds_the_gate(run) -> None:
    metrics = json.loads((run.artifact("evaluate", "evaluation") / "metrics.json").read_text())
    child = metrics["models"]["puzzle"]
    assert 0 < child["accuracy_kept"] and child["speedup"] > 0
    assert run.parameter("evaluate", "accuracy_kept") == pytest.approx(child["accuracy_kept"])
    assert run.parameter("evaluate", "speedup") == pytest.approx(child["speedup"])


def test_baselines_are_evaluated_beside_the_child(run) -> None:
    metrics = json.loads((run.artifact("evaluate", "evaluation") / "metrics.json").read_text())
    assert set(metrics["models"]) == {"parent", "puzzle", "uniform_width"}
    assert len(run.task_dirs("baselines")) == 1  # one task runs every method, one folder each


def test_export_on_the_serving_prefix_loads_with_transformers(run, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from puzzle.io import artifacts, storage

    manifest = artifacts.require_manifest(run.serving_uri, "export")
    local = tmp_path / "served"
    for rel in manifest.files:
        storage.download_file(storage.join(run.serving_uri, rel), local / rel)
    model = AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    config = json.loads((local / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and len(config["block_configs"]) == 3
    realized = json.loads((run.artifact("realize", "child") / "config.json").read_text())
    assert config["block_configs"] == realized["block_configs"]
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert run.parameter("export", "Output") == run.serving_uri


def test_child_is_registered_and_promoted_with_lineage(run) -> None:
    from mlflow import MlflowClient
    from pipeline_local import MODEL_NAME

    client = MlflowClient(tracking_uri=run.tracking_uri, registry_uri=run.tracking_uri)
    version = run.registered_version()
    mv = client.get_model_version(MODEL_NAME, version)
    assert {"candidate", "champion"} <= set(mv.aliases)
    assert mv.tags["puzzle.parent_uri"] == run.parent_uri
    assert json.loads(mv.tags["puzzle.constraints"]) == ["parameters<=0.8x"]
    assert float(mv.tags["puzzle.accuracy_kept"]) == pytest.approx(
        run.parameter("evaluate", "accuracy_kept"), rel=1e-4
    )
    assert mv.tags["puzzle.profile"] == "tiny"
    assert run.parameter("register", "Output") is True
    assert run.parameter("promote", "Output") is True


def test_exit_handler_closes_the_mlflow_run_with_the_outcome(run) -> None:
    from mlflow import MlflowClient
    from pipeline_local import EXPERIMENT

    client = MlflowClient(tracking_uri=run.tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`puzzle.outcome` = 'SUCCEEDED'")
    assert len(runs) == 1
    top = runs[0]
    assert top.info.status == "FINISHED"
    assert run.parameter("record-outcome", "Output") == "FINISHED"
    phases = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{top.info.run_id}'"
    )
    logged = {r.data.tags.get("puzzle.phase") for r in phases}
    assert {
        "convert",
        "library",
        "bld",
        "scoring",
        "costs",
        "search",
        "realize",
        "gkd",
        "baselines-uniform_width",
        "evaluate",
        "export",
    } <= logged
