"""MLflow tracking: a Puzzle run's phases logged to a real MLflow server with artifacts on real S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from puzzle.mlflow import tracking

# --------------------------------------------------------------------------- no server needed


def test_tracking_is_a_no_op_without_a_tracking_uri(monkeypatch, tiny_parent: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.pipeline_run({"parent": "x", "tracking": {"uri": None}}, "no-tracking") as run:
        assert run is None
        assert tracking.active_run() is None
        assert tracking.log_phase("parent", str(tiny_parent)) is None
        tracking.log_metrics({"a": 1.0})
        tracking.log_metrics_history([{"step": 1, "loss": 1.0}], prefix="gkd/")


def test_tracking_uri_precedence_and_run_dir(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None) is None
    assert tracking.resolve_tracking_uri("http://cfg:5000") == "http://cfg:5000"
    assert (
        tracking.resolve_tracking_uri("run-dir", str(tmp_path / "out"))
        == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri("http://cfg:5000") == "http://env:5000"
    assert tracking.resolve_tracking_uri("http://cfg:5000", override="http://arg:5000") == "http://arg:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(tracking.TrackingError, match="tracking.uri 'run-dir'.*S3"):
        tracking.resolve_tracking_uri("run-dir", "s3://bucket/prefix")


def test_flatten_and_history_file_discovery(tmp_path: Path) -> None:
    assert tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": "x",
    }
    (tmp_path / "gkd_history.json").write_text(
        json.dumps([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    )
    assert [r["loss"] for r in tracking._find_history(tmp_path)] == [2.0, 1.5]


# --------------------------------------------------------------------------- phase artifacts
# Every artifact comes from the real phase functions on the tiny parent, at their smallest budgets.

LAYERS = 3


@pytest.fixture(scope="module")
def phase_artifacts(tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from puzzle import data
    from puzzle.child import evaluate
    from puzzle.child import gkd as distill
    from puzzle.config import (
        CostsConfig,
        DataConfig,
        EvaluateConfig,
        GKDConfig,
        LibraryConfig,
        ScoringConfig,
        SearchConfig,
    )
    from puzzle.library import scoring
    from puzzle.library import variants as library
    from puzzle.search import costs
    from puzzle.search import mip as search

    root = tmp_path_factory.mktemp("phases")
    tokens = str(root / "tokens")
    data.prepare(
        str(tiny_parent),
        tokens,
        DataConfig(seq_len=32, splits={"calibration": 4, "gkd": 8, "eval": 4}, seed=0),
    )
    gkd = str(root / "gkd")
    distill.distill(
        str(tiny_parent),
        str(tiny_parent),
        tokens,
        gkd,
        GKDConfig(token_budget=4 * 2 * 32, batch_size=2),
        device="cpu",
    )
    library_uri = str(root / "library")
    library.build_library(
        str(tiny_parent),
        tokens,
        library_uri,
        LibraryConfig(
            kv_heads=[1], attention_linear=False, ffn_fractions=[0.5], ffn_linear=False, batch_size=4
        ),
        device="cpu",
    )
    scores = str(root / "scores")
    scoring.score(
        library_uri,
        str(tiny_parent),
        tokens,
        scores,
        ScoringConfig(split="eval", metrics=["kl_div", "lm_loss"], batch_size=4),
        device="cpu",
    )
    cost_table = str(root / "costs")
    costs.measure(
        library_uri,
        str(tiny_parent),
        cost_table,
        CostsConfig(batch_sizes=[1, 2], prompt_len=8, gen_len=4, repeats=1, stack_layers=2),
        device="cpu",
    )
    solutions = str(root / "solutions")
    search.search(
        scores,
        cost_table,
        solutions,
        SearchConfig(objective="kl_div", constraints=["params<=0.9x"], num_solutions=2, alpha=0.5),
    )
    evaluation = str(root / "evaluation")
    evaluate.evaluate_children(
        {"child": gkd},
        str(tiny_parent),
        tokens,
        evaluation,
        EvaluateConfig(split="eval", batch_size=4, repeats=1, bootstrap=100, batch_sizes=[1]),
        CostsConfig(batch_sizes=[1, 2], prompt_len=8, gen_len=4),
        SearchConfig(constraints=["params<=0.9x"]),
        device="cpu",
    )
    return {
        "scores": scores,
        "costs": cost_table,
        "solutions": solutions,
        "gkd": gkd,
        "evaluation": evaluation,
        "tokens": tokens,
    }


CONFIG = {
    "parent": "tiny-llama",
    "output": "/tmp/unused",
    "gkd": {"lr": 1e-4, "token_budget": 256},
    "search": {"constraints": ["throughput>=1.5x"]},
    "tracking": {"uri": None, "experiment": "puzzle-tracking-test"},
}


@pytest.mark.integration
def test_a_puzzle_run_logs_every_phase_to_mlflow_with_artifacts_on_s3(
    mlflow_server, s3_server, phase_artifacts: dict[str, str], monkeypatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("KFP_RUN_ID", "kfp-run-123")
    with tracking.pipeline_run(CONFIG, "tiny-puzzle", close=True) as run:
        assert run is not None and tracking.active_run() is run
        ids = {
            kind: tracking.log_phase(kind if kind != "gkd" else "child", uri, name=kind)
            for kind, uri in phase_artifacts.items()
        }
        # Logging the same artifact again (a retried step) creates nothing new.
        assert tracking.log_phase("scores", phase_artifacts["scores"], name="scores") == ids["scores"]

    client = MlflowClient(mlflow_server.url)
    top = client.get_run(run.run_id)
    assert top.info.status == "FINISHED"
    assert top.data.tags[tracking.TAG_KFP_RUN_ID] == "kfp-run-123"
    assert top.data.params["gkd.lr"] == "0.0001"
    assert json.loads(top.data.params["search.constraints"]) == ["throughput>=1.5x"]
    nested = client.search_runs(
        [run.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.run_id}'"
    )
    assert sorted(r.data.tags[tracking.TAG_PHASE] for r in nested) == sorted(phase_artifacts)

    # Scores: a table with one row per scored (layer, block), and the heatmap.
    table = client.load_table(run.experiment_id, "tables/scores.json", run_ids=[ids["scores"]])
    rows = tracking.read_csv_rows(Path(phase_artifacts["scores"]) / "scores.csv")
    assert len(table) == len(rows) > LAYERS
    assert {"layer", "kl_div", "lm_loss"} <= set(table.columns)
    assert table["kl_div"].max() == pytest.approx(max(r["kl_div"] for r in rows))
    assert "files/heatmap.png" in {a.path for a in client.list_artifacts(ids["scores"], "files")}

    # Costs: a table per hardware target, hardware identity and workload as params.
    table_json = json.loads((Path(phase_artifacts["costs"]) / "costs.json").read_text())
    costs_run = client.get_run(ids["costs"])
    assert costs_run.data.params["hardware.device_name"] == table_json["hardware"]["device_name"]
    assert costs_run.data.params["hardware.dtype"] == "float32"
    assert json.loads(costs_run.data.params["workload.batch_sizes"]) == [1, 2]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in table_json["hardware"]["device_name"])
    cost_rows = client.load_table(run.experiment_id, f"tables/costs_{safe}.json", run_ids=[ids["costs"]])
    assert len(cost_rows) == len(table_json["rows"]) and {"subblock", "batch_size", "decode_ms"} <= set(
        cost_rows.columns
    )

    # Solutions: every solution with its blocks, objective and constraint totals, and the parent.
    sols = client.load_table(run.experiment_id, "tables/solutions.json", run_ids=[ids["solutions"]])
    assert list(sols["solution"]) == [0, 1, "parent"]
    assert {"objective", "totals.throughput", "totals.params", "blocks"} <= set(sols.columns)
    assert len(sols["blocks"][0].split(" | ")) == LAYERS

    # GKD: the loss curve as step metrics, one point per training step.
    history = json.loads((Path(phase_artifacts["gkd"]) / "gkd_history.json").read_text())
    curve = client.get_metric_history(ids["gkd"], "gkd/loss")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [r["step"] for r in history]
    assert len(history) >= 2

    # Evaluation: metrics on the phase run and on the pipeline run, the comparison table, the report.
    figures = json.loads((Path(phase_artifacts["evaluation"]) / "metrics.json").read_text())
    eval_metrics = client.get_run(ids["evaluation"]).data.metrics
    assert eval_metrics["models.child.kl_div"] == pytest.approx(figures["models"]["child"]["kl_div"])
    assert top.data.metrics["speedup"] == pytest.approx(figures["speedup"])
    # accuracy_kept is null where the random tiny parent predicts no token right, and null is not a metric.
    if figures["accuracy_kept"] is None:
        assert "accuracy_kept" not in top.data.metrics
    else:
        assert top.data.metrics["accuracy_kept"] == pytest.approx(figures["accuracy_kept"])
    models = client.load_table(run.experiment_id, "tables/models.json", run_ids=[ids["evaluation"]])
    assert sorted(models["model"]) == ["child", "parent"]
    assert "report/report.html" in {a.path for a in client.list_artifacts(run.run_id, "report")}

    # Everything went through the server's artifact proxy into the S3 bucket.
    keys = [
        o["Key"]
        for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=mlflow_server.bucket)
        for o in page.get("Contents", [])
    ]
    assert any(k.endswith(f"{ids['scores']}/artifacts/tables/scores.json") for k in keys)
    assert any(k.endswith(f"{ids['scores']}/artifacts/files/heatmap.png") for k in keys)
    assert any(k.endswith(f"{run.run_id}/artifacts/report/report.html") for k in keys)
    # Weights never go to the tracking store (only reports and tables).
    assert not any(k.endswith(".safetensors") for k in keys if ids["gkd"] in k)


@pytest.mark.integration
def test_kfp_components_share_one_mlflow_run(
    mlflow_server, phase_artifacts: dict[str, str], monkeypatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.delenv("KFP_RUN_ID", raising=False)
    config = {**CONFIG, "tracking": {"uri": None, "experiment": "puzzle-kfp-test"}}
    # Two components of the same KFP run, each in its own "process": one MLflow run, left open.
    with tracking.pipeline_run(config, "kfp", kfp_run_id="kfp-abc") as first:
        first.log_phase("scores", phase_artifacts["scores"])
    with tracking.pipeline_run(config, "kfp", kfp_run_id="kfp-abc") as second:
        second.log_phase("costs", phase_artifacts["costs"])
    assert first.run_id == second.run_id
    client = MlflowClient(mlflow_server.url)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    # The exit handler closes it with the pipeline's outcome.
    assert tracking.finish_pipeline_run("kfp-abc", "FAILED", experiment="puzzle-kfp-test") == first.run_id
    assert client.get_run(first.run_id).info.status == "FAILED"
    nested = client.search_runs(
        [first.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{first.run_id}'"
    )
    assert sorted(r.data.tags[tracking.TAG_KIND] for r in nested) == ["costs", "scores"]


def test_a_run_dir_store_keeps_its_artifacts_under_the_output_root(tmp_path: Path, monkeypatch) -> None:
    """run-dir is a SQLite store under the output: its artifacts go there too, not into ./mlruns."""
    from puzzle.mlflow import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    output = tmp_path / "out"
    with tracking.pipeline_run({"tracking": {"uri": "run-dir"}, "output": str(output)}, name="t") as run:
        assert run is not None
        run.client.log_text(run.run_id, "hello", "note.txt")
    assert list(cwd.iterdir()) == []
    assert [p.name for p in (output / "mlartifacts").rglob("note.txt")] == ["note.txt"]
