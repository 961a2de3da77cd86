"""`puzzle run --jobs N` (units on worker processes) and `--until`, on a tiny parent on the CPU: the
same artifacts as one phase at a time, shards and baselines side by side, speed measured alone,
resume, and refusals before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from corpus import STDLIB_TEXT  # noqa: E402
from test_run import tiny_config_data

from puzzle.config import parse_config
from puzzle.io import artifacts
from puzzle.run import run
from puzzle.workers import JobsError, check_jobs


def _config(tiny_parent_factory, root: Path, name: str) -> dict:
    parent = tiny_parent_factory("llama", intermediate_size=512)
    text = root / "corpus.txt"
    text.write_text(STDLIB_TEXT * 3)
    data = tiny_config_data(parent, root / name, text)
    data["bld"]["shards"] = 2
    data["scoring"]["shards"] = 2
    data["baselines"]["methods"] = ["layer_dropping", "noop_only"]
    return data


def _overlap(a, b) -> bool:
    return a.started < b.started + b.seconds and b.started < a.started + a.seconds


@pytest.fixture(scope="module")
def runs(tiny_parent_factory, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("jobs")
    serial = _config(tiny_parent_factory, root, "serial")
    parallel = {**serial, "output": str(root / "parallel")}
    until = run(parse_config(parallel), jobs=2, until="costs")
    return {
        "serial": run(parse_config(serial)),
        "until": until,
        "parallel": run(parse_config(parallel), jobs=2),
        "config": parallel,
    }


def test_until_stops_after_the_stage_and_the_full_run_carries_on_from_there(runs) -> None:
    upstream = ["convert", "data", "library", "bld", "scoring", "costs"]
    done = [r.phase for r in runs["until"].phases]
    assert {p.split("-shard-")[0] for p in done} == set(upstream)
    later = runs["parallel"]
    assert not any(later.record(p).rebuilt for p in done)
    assert {"search", "realize", "gkd", "evaluate", "export"} <= set(later.rebuilt)


def test_jobs_builds_the_same_phases_and_artifacts_as_one_at_a_time(runs) -> None:
    serial, parallel = runs["serial"], runs["parallel"]
    assert {r.phase for r in parallel.phases} == {r.phase for r in serial.phases}
    for record in parallel.phases:
        assert artifacts.read_manifest(record.uri) is not None, record.phase
    # Deterministic phases give the same figures whichever process ran them.
    s_scores = Path(serial.record("scoring").uri) / "scores.csv"
    p_scores = Path(runs["until"].record("scoring").uri) / "scores.csv"
    assert s_scores.read_text() == p_scores.read_text()
    s_gkd, p_gkd = serial.record("gkd").summary, parallel.record("gkd").summary
    assert s_gkd["steps"] == p_gkd["steps"]
    assert s_gkd["final_loss"] == pytest.approx(p_gkd["final_loss"], rel=1e-4)


def test_shards_and_baselines_ran_side_by_side_and_speed_was_measured_alone(runs) -> None:
    records = {r.phase: r for r in [*runs["until"].phases, *runs["parallel"].phases] if r.rebuilt}
    assert _overlap(records["bld-shard-0"], records["bld-shard-1"])
    assert _overlap(records["scoring-shard-0"], records["scoring-shard-1"])
    chain = [records[p] for p in ("search", "realize", "gkd")]
    baselines = [records["baselines-layer_dropping"], records["baselines-noop_only"]]
    assert any(_overlap(a, b) for a in chain + baselines for b in baselines if a is not b)
    # On a CPU the cost table, the search and the evaluation measure speed: nothing beside them.
    for timed in ("costs", "search", "evaluate"):
        others = [r for p, r in records.items() if p != timed]
        assert not [r.phase for r in others if _overlap(records[timed], r)], timed


def test_running_again_with_jobs_skips_every_phase(runs) -> None:
    again = run(parse_config(runs["config"]), jobs=2)
    assert again.rebuilt == []


def test_a_failing_unit_stops_new_ones_and_raises_its_error(runs, tmp_path: Path) -> None:
    data = {**runs["config"], "output": str(tmp_path / "fails")}
    # The data phase fails (its corpus is gone): nothing after it starts, the error is the phase's.
    data["data"] = {**data["data"], "source": str(tmp_path / "missing.txt")}
    with pytest.raises(Exception, match="missing.txt"):
        run(parse_config(data), jobs=2, check_access=False)
    assert artifacts.read_manifest(str(tmp_path / "fails" / "library")) is None


@pytest.mark.parametrize(
    ("jobs", "device", "match"),
    [
        (0, "cpu", "at least 1"),
        (10_000, "cpu", "CPU cores"),
        (2, "cuda:1", "pinned"),
        (2, "mps", "cuda or cpu"),
    ],
)
def test_jobs_the_machine_cannot_serve_are_refused(jobs: int, device: str, match: str) -> None:
    with pytest.raises(JobsError, match=match):
        check_jobs(jobs, device)


def test_until_must_name_a_stage(runs) -> None:
    with pytest.raises(Exception, match="not a stage"):
        run(parse_config(runs["config"]), until="nonsense")


def test_the_cli_takes_jobs_and_until(runs, capsys) -> None:
    from puzzle.cli import main

    config = Path(runs["config"]["output"]).parent / "jobs.yaml"
    config.write_text(yaml.safe_dump(runs["config"]))
    assert main(["run", "--config", str(config), "--jobs", "2", "--until", "costs"]) == 0
    out = capsys.readouterr().out
    assert "stopped after costs (--until)" in out and "up to date" in out
    manifest = Path(runs["config"]["output"]) / "costs" / "manifest.json"
    assert json.loads(manifest.read_text())["kind"] == "costs"
