"""The baseline comparison evaluates the Puzzle child and each baseline against the parent, in one report."""

from __future__ import annotations

import json
from pathlib import Path

from kfp import dsl

from components.baselines.component import compare_baselines


def _run(tmp_path: Path, methods: list[str], **inputs: Path) -> dsl.Artifact:
    comparison = dsl.Artifact(name="comparison", uri=str(tmp_path / "comparison"), metadata={})
    compare_baselines.python_func(
        child=dsl.Model(name="child", uri=str(inputs["child"]), metadata={}),
        parent=dsl.Model(name="parent", uri=str(inputs["parent"]), metadata={}),
        library=dsl.Model(name="library", uri=str(inputs["library"]), metadata={}),
        scores=dsl.Artifact(name="scores", uri=str(inputs["scores"]), metadata={}),
        costs=dsl.Artifact(name="costs", uri=str(inputs["costs"]), metadata={}),
        tokens=dsl.Dataset(name="tokens", uri=str(inputs["tokens"]), metadata={}),
        methods=methods,
        constraints=["parameters<=0.8x"],
        comparison=comparison,
        report=dsl.HTML(name="report", uri=str(tmp_path / "report.html"), metadata={}),
        gkd=True,
        gkd_token_budget=64,
        gkd_batch_size=2,
        gkd_device="cpu",
        evaluate_batch_size=4,
        workload_prompt_len=4,
        workload_gen_len=3,
        evaluate_repeats=1,
        evaluate_device="cpu",
    )
    return comparison


def test_baselines_are_realized_distilled_and_evaluated_with_the_child(
    tiny_realized, tiny_child, tiny_trained_library, tiny_scores, tiny_costs, tiny_tokens, tmp_path: Path
) -> None:
    inputs = dict(
        child=tiny_realized,
        parent=tiny_child,
        library=tiny_trained_library,
        scores=tiny_scores,
        costs=tiny_costs,
        tokens=tiny_tokens,
    )
    comparison = _run(tmp_path, ["uniform_width"], **inputs)

    metrics = json.loads((tmp_path / "comparison" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"parent", "puzzle", "uniform_width"}
    assert metrics["models"]["uniform_width"]["role"] == "baseline"
    assert metrics["models"]["uniform_width"]["parameters_kept"] <= 0.8 + 1e-9  # the same constraint
    assert "<html" in (tmp_path / "report.html").read_text().lower()
    assert comparison.metadata["methods"] == "uniform_width"
    assert not (tmp_path / "baselines-work").exists()  # intermediate children are not kept


def test_no_baselines_evaluates_the_child_alone(
    tiny_realized, tiny_child, tiny_trained_library, tiny_scores, tiny_costs, tiny_tokens, tmp_path: Path
) -> None:
    inputs = dict(
        child=tiny_realized,
        parent=tiny_child,
        library=tiny_trained_library,
        scores=tiny_scores,
        costs=tiny_costs,
        tokens=tiny_tokens,
    )
    _run(tmp_path, [], **inputs)

    assert set(json.loads((tmp_path / "comparison" / "metrics.json").read_text())["models"]) == {
        "parent",
        "puzzle",
    }
