"""The evaluate component measures the child against the parent and returns the gate's figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kfp import dsl

from components.evaluate.component import evaluate


def test_evaluate_reports_accuracy_kept_and_speedup(
    tiny_realized: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    evaluation = dsl.Artifact(name="evaluation", uri=str(tmp_path / "evaluation"), metadata={})
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"), metadata={})
    report = dsl.HTML(name="report", uri=str(tmp_path / "report.html"), metadata={})
    empty = tmp_path / "no-baselines"
    empty.mkdir()

    accuracy_kept, speedup = evaluate.python_func(
        child=dsl.Model(name="child", uri=str(tiny_realized), metadata={}),
        baselines=dsl.Model(name="children", uri=str(empty), metadata={}),
        parent=dsl.Model(name="parent", uri=str(tiny_parent), metadata={}),
        tokens=dsl.Dataset(name="tokens", uri=str(tiny_tokens), metadata={}),
        evaluation=evaluation,
        metrics=metrics,
        report=report,
        evaluate_config={"batch_size": 4, "repeats": 1, "bootstrap": 100},
        costs_config={"batch_sizes": [1], "prompt_len": 8, "gen_len": 4},
        search_config={"constraints": ["parameters<=0.95x"]},
        device="cpu",
    )

    written = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["models"]["puzzle"]
    # A random tiny parent may predict no token right: accuracy kept is then undefined (None in
    # metrics.json) and the component returns 0.0, so the registry gate fails closed.
    assert math.isclose(
        accuracy_kept, written["accuracy_kept"] if written["accuracy_kept"] is not None else 0.0
    )
    assert math.isclose(speedup, written["speedup"]) and speedup > 0
    assert metrics.metadata.get("accuracy_kept", 0.0) == accuracy_kept
    assert metrics.metadata["kl_div"] > 0  # the child has no-op blocks: it differs from the parent
    assert "<html" in (tmp_path / "report.html").read_text().lower()
