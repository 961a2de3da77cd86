"""`puzzle run` end to end on a tiny parent: export, resume, partial re-runs, kill during GKD,
and invalid configurations that fail before any model is loaded."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from corpus import STDLIB_TEXT  # noqa: E402

from puzzle.config import parse_config
from puzzle.io import artifacts
from puzzle.run import run

ROOT = Path(__file__).resolve().parents[1]
GKD_STEPS = 40
UPSTREAM = ["convert", "data", "library", "bld", "scoring", "costs"]
# Every stage's output folder under the run's output (the baselines: baselines/<method>/).
STAGE_FOLDERS = {
    "convert": "parent",
    "data": "tokens",
    "library": "library",
    "bld": "trained",
    "scoring": "scores",
    "costs": "costs",
    "search": "solutions",
    "realize": "child",
    "gkd": "distilled",
    "evaluate": "evaluation",
    "export": "export",
}


def tiny_config_data(parent: Path, output: Path, text: Path) -> dict:
    return {
        "parent": str(parent),
        "output": str(output),
        "device": "cpu",
        "data": {
            "source": str(text),
            "seq_len": 32,
            # GKD's 40 steps of 4 sequences: 4 passes over its split, the most gkd.max_epochs allows.
            "splits": {"calibration": 8, "bld": 16, "score": 4, "gkd": 40, "eval": 8},
        },
        "library": {
            "kv_heads": None,
            "attention_linear": True,
            "attention_noop": True,
            "ffn_fractions": [1.0, 0.5],
            "ffn_linear": False,
            "ffn_noop": True,
        },
        "bld": {"token_budget": 512, "batch_size": 4},
        "scoring": {"batch_size": 4},
        "costs": {"batch_sizes": [1], "prompt_len": 8, "gen_len": 8, "repeats": 1},
        "search": {"constraints": ["parameters<=0.85x"], "num_solutions": 1},
        "gkd": {
            "token_budget": GKD_STEPS * 4 * 32,
            "batch_size": 4,
            "lr": 1e-3,
            "checkpoint_every": 2,
        },
        "evaluate": {"batch_size": 4, "repeats": 1, "bootstrap": 100},
        "tracking": {"uri": None},
        "baselines": {"methods": ["layer_dropping"], "gkd": True},
    }


@pytest.fixture(scope="module")
def tiny_run(tiny_parent_factory, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("run")
    parent = tiny_parent_factory("llama", intermediate_size=512)
    text = root / "corpus.txt"
    text.write_text(STDLIB_TEXT * 3)
    data = tiny_config_data(parent, root / "out", text)
    config_file = root / "run.yaml"
    config_file.write_text(yaml.safe_dump(data))
    result = run(parse_config(data))
    return {"root": root, "data": data, "config_file": config_file, "result": result}


def test_run_builds_every_phase_and_exports_a_checkpoint_transformers_loads_and_generates(tiny_run) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = tiny_run["result"]
    phases = [r.phase for r in result.phases]
    assert phases[: len(UPSTREAM)] == UPSTREAM
    assert phases.index("search") < phases.index("realize") < phases.index("gkd") < phases.index("evaluate")
    assert phases[-1] == "export"
    assert set(result.rebuilt) == set(phases)  # a fresh output root: everything built
    out = Path(tiny_run["data"]["output"])
    for phase, directory in STAGE_FOLDERS.items():
        assert result.record(phase).uri == str(out / directory), phase
        assert artifacts.read_manifest(str(out / directory)) is not None, phase
    assert result.record("baselines-layer_dropping").uri == str(out / "baselines" / "layer_dropping")
    assert artifacts.read_manifest(str(out / "baselines" / "layer_dropping")) is not None
    assert result.record("gkd").summary["steps"] == GKD_STEPS

    model = AutoModelForCausalLM.from_pretrained(result.export_uri, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.export_uri, trust_remote_code=True)
    ids = tokenizer("def run(", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 6
    # The exported child is the searched one, not the parent: fewer parameters.
    parent = AutoModelForCausalLM.from_pretrained(tiny_run["data"]["parent"])
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in parent.parameters())

    report = (out / "evaluation" / "report.md").read_text()
    assert "**puzzle** keeps" in report and "| layer_dropping | baseline |" in report


def test_the_run_stores_every_weights_file_once_and_no_working_children(tiny_run) -> None:
    """Issue 16's footprint: children in gkd.save_dtype (float16), the export hard-linked to the
    distilled child it repeats, no realized baseline child or staging folder left behind."""
    from safetensors import safe_open

    out = Path(tiny_run["data"]["output"])
    assert not list(out.rglob("*.partial")) and not (out / "child-steps").exists()
    assert sorted(p.name for p in (out / "baselines" / "layer_dropping-steps").iterdir()) == ["solutions"]
    assert os.path.samefile(out / "export" / "model.safetensors", out / "distilled" / "model.safetensors")
    for folder in ("child", "distilled", "baselines/layer_dropping"):
        with safe_open(str(out / folder / "model.safetensors"), framework="pt") as fh:
            assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float16}, folder  # noqa: SIM118
    with safe_open(str(out / "parent" / "model.safetensors"), framework="pt") as fh:  # the original's
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}  # noqa: SIM118


def test_running_again_skips_every_phase(tiny_run) -> None:
    again = run(parse_config(tiny_run["data"]))
    assert again.rebuilt == []
    assert [r.phase for r in again.phases] == [r.phase for r in tiny_run["result"].phases]


def test_deleting_one_phase_output_reruns_only_it_and_the_phases_after_it(tiny_run) -> None:
    out = Path(tiny_run["data"]["output"])
    before = {r.phase: artifacts.read_manifest(r.uri).created_at for r in tiny_run["result"].phases}
    shutil.rmtree(out / "solutions")
    result = run(parse_config(tiny_run["data"]))
    rebuilt = set(result.rebuilt)
    assert rebuilt == {"search", "realize", "gkd", "evaluate", "export"}
    baselines = [p for p in before if p.startswith("baselines-")]
    assert baselines == ["baselines-layer_dropping"]
    for phase in UPSTREAM + baselines:
        assert artifacts.read_manifest(result.record(phase).uri).created_at == before[phase], phase


def test_a_run_killed_during_gkd_resumes_and_ends_with_the_same_number_of_steps(tiny_run) -> None:
    out = Path(tiny_run["data"]["output"])
    distilled = out / "distilled"
    shutil.rmtree(distilled)
    # The pointer to the latest sharded checkpoint, written once the first checkpoint is complete.
    checkpoint = Path(f"{distilled}.partial") / ".work" / "gkd-checkpoint" / "latest.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "puzzle"), "run", "--config", str(tiny_run["config_file"])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before GKD could be killed:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert artifacts.read_manifest(str(distilled)) is None

    result = run(parse_config(tiny_run["data"]))
    gkd = result.record("gkd")
    assert gkd.rebuilt and gkd.summary["steps"] == GKD_STEPS
    assert 2 <= gkd.summary["resumed_from_step"] < GKD_STEPS
    assert set(result.rebuilt) == {"gkd", "evaluate", "export"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gkd": {"lrr": 1}}, "unknown field gkd.lrr"),
        ({"bld": {"batch_size": "many"}}, "bld.batch_size must be an integer, got 'many'"),
        (
            {"output": "s3://no-such-bucket-anywhere/run"},
            "output 's3://no-such-bucket-anywhere/run' is not reachable",
        ),
        (
            {
                "library": {
                    "kv_heads": [2],
                    "attention_linear": False,
                    "attention_noop": False,
                    "ffn_fractions": [1.0],
                    "ffn_noop": False,
                },
                "search": {"constraints": ["throughput>=1.5x"]},
            },
            "search.constraints[0] 'throughput>=1.5x' is infeasible",
        ),
    ],
)
def test_invalid_configs_fail_before_any_model_is_loaded(
    tiny_run, tmp_path: Path, monkeypatch, capsys, s3_server, change: dict, message: str
) -> None:
    from puzzle import parent as parents
    from puzzle.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was validated")

    monkeypatch.setattr(parents, "load_parent", no_model)
    monkeypatch.setattr(parents, "convert", no_model)
    data = {**tiny_run["data"], "output": str(tmp_path / "out")}
    for key, value in change.items():
        data[key] = (
            {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
        )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_force_rebuilds_a_corrupt_stage_and_what_reads_it(tiny_run) -> None:
    """`puzzle run --force search` over a corrupted search output: the search and every stage after it
    are rebuilt, the stages before it and the baselines are not; an unknown stage is refused first."""
    out = Path(tiny_run["data"]["output"])
    solutions = out / "solutions" / "solutions.json"
    solutions.write_text(solutions.read_text() + " ")  # corrupt: its checksum no longer matches
    with pytest.raises(Exception, match="is not a stage"):
        run(parse_config(tiny_run["data"]), force=("serch",))
    result = run(parse_config(tiny_run["data"]), force=("search",))
    assert set(result.rebuilt) == {"search", "realize", "gkd", "evaluate", "export"}
    manifest = artifacts.read_manifest(str(out / "solutions"))
    assert manifest is not None
    artifacts.verify_local(out / "solutions", manifest, "solutions")  # raises on a checksum mismatch
