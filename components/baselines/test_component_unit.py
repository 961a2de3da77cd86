"""A baseline's child is realized (and distilled) at the Puzzle child's constraints, then evaluated
with the Puzzle child against the parent, in one report."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from kfp import dsl

from components.baselines.component import baselines
from components.evaluate.component import evaluate

SEARCH = {"constraints": ["parameters<=0.9x"]}
GKD = {"token_budget": 64, "batch_size": 2}
EVALUATE = {"batch_size": 4, "repeats": 1, "bootstrap": 100}
COSTS = {"batch_sizes": [1], "prompt_len": 4, "gen_len": 3}


def _baselines(tmp_path: Path, methods: list[str], search: dict = SEARCH, **inputs: Path) -> dsl.Model:
    children = dsl.Model(name="children", uri=str(tmp_path / "children"), metadata={})
    baselines.python_func(
        library=dsl.Model(name="library", uri=str(inputs["library"]), metadata={}),
        scores=dsl.Artifact(name="scores", uri=str(inputs["scores"]), metadata={}),
        costs=dsl.Artifact(name="costs", uri=str(inputs["costs"]), metadata={}),
        parent=dsl.Model(name="parent", uri=str(inputs["parent"]), metadata={}),
        tokens=dsl.Dataset(name="tokens", uri=str(inputs["tokens"]), metadata={}),
        children=children,
        search_config=search,
        gkd_config=GKD,
        baselines_config={"methods": methods, "gkd": True},
        device="cpu",
    )
    return children


def _evaluate(
    tmp_path: Path, baseline_children: dsl.Model, search: dict = SEARCH, **inputs: Path
) -> dsl.Artifact:
    evaluation = dsl.Artifact(name="evaluation", uri=str(tmp_path / "evaluation"), metadata={})
    evaluate.python_func(
        child=dsl.Model(name="child", uri=str(inputs["child"]), metadata={}),
        baselines=baseline_children,
        parent=dsl.Model(name="parent", uri=str(inputs["parent"]), metadata={}),
        tokens=dsl.Dataset(name="tokens", uri=str(inputs["tokens"]), metadata={}),
        evaluation=evaluation,
        metrics=dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"), metadata={}),
        report=dsl.HTML(name="report", uri=str(tmp_path / "report.html"), metadata={}),
        evaluate_config=EVALUATE,
        costs_config=COSTS,
        search_config=search,
        device="cpu",
    )
    return evaluation


def child_kind(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["kind"]


def test_baselines_are_realized_distilled_and_evaluated_with_the_child(
    tiny_realized,
    tiny_parent,
    tiny_trained_library,
    tiny_scores,
    tiny_costs,
    tiny_tokens,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inputs = dict(
        child=tiny_realized,
        parent=tiny_parent,
        library=tiny_trained_library,
        scores=tiny_scores,
        costs=tiny_costs,
        tokens=tiny_tokens,
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    children = _baselines(tmp_path, ["uniform_width"], **inputs)
    _evaluate(tmp_path, children, **inputs)

    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"parent", "puzzle", "uniform_width"}
    assert metrics["models"]["uniform_width"]["role"] == "baseline"
    assert metrics["models"]["uniform_width"]["parameters_kept"] <= 0.9 + 1e-9  # the same constraint
    assert "<html" in (tmp_path / "report.html").read_text().lower()
    assert sorted(p.name for p in (tmp_path / "children").iterdir()) == ["uniform_width"]
    assert child_kind(tmp_path / "children" / "uniform_width") == "child"
    assert set(children.metadata) == {"uniform_width"}  # the child's content hash, by method
    assert not list(scratch.iterdir())  # intermediate children are not kept


def test_no_baselines_evaluates_the_child_alone(
    tiny_realized, tiny_parent, tiny_trained_library, tiny_scores, tiny_costs, tiny_tokens, tmp_path: Path
) -> None:
    inputs = dict(
        child=tiny_realized,
        parent=tiny_parent,
        library=tiny_trained_library,
        scores=tiny_scores,
        costs=tiny_costs,
        tokens=tiny_tokens,
    )
    children = _baselines(tmp_path, [], **inputs)
    assert list((tmp_path / "children").iterdir()) == []  # no baselines: an empty folder, not an error
    _evaluate(tmp_path, children, **inputs)

    assert set(json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["models"]) == {
        "parent",
        "puzzle",
    }


def test_a_baseline_that_cannot_reach_the_target_is_reported_not_compared(
    tiny_realized, tiny_parent, tiny_trained_library, tiny_scores, tiny_costs, tiny_tokens, tmp_path: Path
) -> None:
    inputs = dict(
        child=tiny_realized,
        parent=tiny_parent,
        library=tiny_trained_library,
        scores=tiny_scores,
        costs=tiny_costs,
        tokens=tiny_tokens,
    )
    children = _baselines(tmp_path, ["uniform_width"], search={"constraints": ["parameters<=0.8x"]}, **inputs)
    # No uniform width reaches 0.8x of the parent's parameters (skipping a sub-block is not a width).
    assert child_kind(tmp_path / "children" / "uniform_width") == "solutions"
    _evaluate(tmp_path, children, search={"constraints": ["parameters<=0.8x"]}, **inputs)

    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"parent", "puzzle"}
    assert "no single width used in every layer meets" in metrics["unreachable"]["uniform_width"]
    report = (tmp_path / "evaluation" / "report.md").read_text()
    assert "**uniform_width** cannot reach the target, so it is not compared" in report
