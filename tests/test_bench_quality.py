"""benchmarks/bench_quality.py's own logic, without a GPU: the plan of processes it starts (and
``--only``), ``merge`` of the summaries of several machines, ``plot``'s refusal of nothing to draw."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "quality_gpu.json"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "benchmarks" / "bench_quality.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _args(tmp_path: Path, **over: object) -> argparse.Namespace:
    base = dict(
        work=str(tmp_path),
        gpus=4,
        targets=[2.0, 1.5],
        batch=64,
        parent="/p.gguf",
        corpus="/c",
        set=["gkd.token_budget=1024"],
        no_bld=True,
        ablation=True,
        only=[],
        evaluate_s=180.0,
    )
    base.update(over)
    return argparse.Namespace(**base)


def _main(bench: ModuleType, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["bench_quality.py", *argv])
    return bench.main()


def test_the_plan_runs_upstream_once_then_the_targets_side_by_side_then_the_ablations(
    bench: ModuleType, tmp_path: Path
) -> None:
    tasks = {t.name: t for t in bench.plan(_args(tmp_path))}
    assert list(tasks) == [
        "upstream",
        "upstream-nobld",
        "t1.5",
        "t2",
        "t1.5-nobld",
        "t1.5-no-gkd",
        "t2-no-gkd",
        "t1.5-nobld-no-gkd",
    ]
    assert tasks["upstream"].after == () and tasks["upstream"].gpus == 4
    assert "--until" in tasks["upstream"].run_args
    # each target gets half of the GPUs and starts once both upstream runs are done
    assert tasks["t1.5"].gpus == tasks["t2"].gpus == 2
    assert tasks["t1.5"].after == tasks["t2"].after == ("upstream-nobld",)
    assert "search.constraints=['throughput>=2x@bs64']" in tasks["t2"].overrides
    assert "gkd.token_budget=1024" in tasks["t2"].overrides
    assert tasks["t2-no-gkd"].ablate and tasks["t2-no-gkd"].after == ("t2",)
    assert tasks["t1.5"].root == tmp_path.resolve() / "t1.5"
    # the no-BLD ablation trains no block: its overrides differ from the BLD run's by exactly those
    extra = set(tasks["t1.5-nobld"].overrides) - set(tasks["t1.5"].overrides)
    assert extra == {f"output={tmp_path.resolve() / 't1.5-nobld'}", *bench.NO_BLD_SETS}


def test_only_keeps_the_named_tasks_free_of_the_others_and_names_the_plan_on_a_typo(
    bench: ModuleType, tmp_path: Path
) -> None:
    tasks = bench.plan(_args(tmp_path, gpus=1, only=["t1.5-nobld", "upstream-nobld"]))
    assert [t.name for t in tasks] == ["upstream-nobld", "t1.5-nobld"]
    assert tasks[0].after == ()  # "upstream" is not run here: no waiting on it
    assert tasks[1].after == ("upstream-nobld",)
    with pytest.raises(SystemExit, match=r"--only: no task t3 \(the plan's tasks: upstream, "):
        bench.plan(_args(tmp_path, only=["t3"]))
    without = [t.name for t in bench.plan(_args(tmp_path, no_bld=False, ablation=False))]
    assert without == ["upstream", "t1.5", "t2"]


def _part(result: dict, keep: set[str], targets: set[str], card: str) -> dict:
    part = {k: v for k, v in result.items() if k not in ("parts", "children", "targets")}
    part["children"] = [dict(c) for c in result["children"] if c["name"] in keep]
    part["targets"] = {k: v for k, v in result["targets"].items() if k in targets}
    part["card"] = card
    return part


def test_merge_joins_the_parts_children_and_targets_and_records_each_part(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = json.loads(RESULT.read_text())
    nobld = {c["name"] for c in result["children"] if c["method"].startswith("no_bld")}
    main = _part(result, {c["name"] for c in result["children"]} - nobld, {"t1.5", "t2"}, "card A")
    side = _part(result, nobld, {"t1.5-nobld"}, "card B")
    for child in side["children"]:
        child["bld_tokens_per_variant"] = None  # written before summaries carried it
    (tmp_path / "main.json").write_text(json.dumps(main))
    (tmp_path / "side.json").write_text(json.dumps(side))
    out = tmp_path / "merged.json"
    assert (
        _main(
            bench,
            monkeypatch,
            "merge",
            f"{tmp_path / 'main.json'}=four GPUs",
            str(tmp_path / "side.json"),
            "--out",
            str(out),
        )
        == 0
    )
    merged = json.loads(out.read_text())
    assert [c["name"] for c in merged["children"]] == [c["name"] for c in result["children"]]
    assert sorted(merged["targets"]) == ["t1.5", "t1.5-nobld", "t2"]
    assert merged["card"] == ["card A", "card B"]
    assert [(p["file"], p["description"]) for p in merged["parts"]] == [
        ("main.json", "four GPUs"),
        ("side.json", None),
    ]
    budget = result["targets"]["t1.5-nobld"]["budgets"]["bld_tokens_per_variant"]
    assert all(c["bld_tokens_per_variant"] == budget for c in merged["children"] if c["name"] in nobld)
    assert merged["not_run"] == {}

    (tmp_path / "other.json").write_text(json.dumps({"issue": 12}))
    with pytest.raises(SystemExit, match="other.json: not a quality_gpu.json written by `summarize`"):
        _main(bench, monkeypatch, "merge", str(tmp_path / "other.json"), "--out", str(out))


def test_plot_draws_the_trained_children_and_refuses_when_none_is_left(
    bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    png = tmp_path / "q.png"
    assert _main(bench, monkeypatch, "plot", "--json", str(RESULT), "--out", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match=r"no GKD'd child with a measured speedup <= 1x to plot"):
        _main(bench, monkeypatch, "plot", "--json", str(RESULT), "--out", str(png), "--max-speedup", "1")
