"""The run configuration: typed, validated, and failing early with the field named."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from puzzle.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    parse_config,
    reference_markdown,
)
from puzzle.run import Runner
from puzzle.stages import stage

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def field_paths(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += field_paths(type(default), f"{path}.")
        else:
            out.append(path)
    return out


def test_embedded_default_loads_with_the_real_parent_and_a_speed_constraint(tmp_path: Path) -> None:
    config = load_config(None, [f"output={tmp_path / 'run'}"])
    assert config.parent == "smollm2"
    assert config.data.source == "stdlib"
    (constraint,) = config.search.parsed_constraints
    assert (constraint.metric, constraint.op, constraint.value, constraint.relative) == (
        "throughput",
        ">=",
        1.5,
        True,
    )
    # Round trip: the dumped YAML loads back to the same configuration.
    assert parse_config(yaml.safe_load(config.to_yaml())) == config
    # Every stage writes under the output root, in the folder the stage graph names.
    assert Runner(config).uri(stage("bld").folder) == str(tmp_path / "run" / "trained")


def test_the_embedded_default_is_the_dataclass_defaults_and_docs_are_generated_from_them() -> None:
    assert RunConfig() == load_config(None, check_access=False)
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), (
        "docs/config.md is stale: regenerate it with `python -m puzzle.config > docs/config.md`"
    )


def test_a_file_overrides_only_what_it_names_and_set_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"output": str(tmp_path / "o"), "gkd": {"lr": 3e-4}})
    config = load_config(path, ["gkd.batch_size=6", "search.constraints=['throughput>=2x', 'memory<=1GiB']"])
    assert config.gkd.lr == 3e-4 and config.gkd.batch_size == 6
    assert config.bld == load_config(None, [f"output={tmp_path}"]).bld
    memory = config.search.parsed_constraints[1]
    assert (memory.metric, memory.value, memory.relative) == ("memory", 1024.0, False)  # MiB


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bld": {"lrr": 1e-3}}, "unknown field bld.lrr (did you mean 'lr'?)"),
        ({"gkdd": {}}, "unknown field gkdd (did you mean 'gkd'?)"),
        (
            {"search": {"constraint": ["params<=0.5x"]}},
            "unknown field search.constraint (did you mean 'constraints'?)",
        ),
        ({"gkd": {"batch_size": "eight"}}, "gkd.batch_size must be an integer, got 'eight'"),
        ({"gkd": {"grad_checkpointing": "yes"}}, "gkd.grad_checkpointing must be true or false"),
        ({"costs": {"batch_sizes": 4}}, "costs.batch_sizes must be a list of integer"),
        ({"bld": "fast"}, "bld must be a mapping of fields"),
        ({"bld": {"lr": -1}}, "bld.lr must be > 0, got -1"),
        ({"search": {"alpha": 1.5}}, "search.alpha must be in (0, 1), got 1.5"),
        ({"data": {"splits": {"eval": 8}}}, "data.splits needs a 'calibration' entry"),
        ({"evaluate": {"split": "test"}}, "evaluate.split must be one of data.splits"),
        ({"device": "tpu"}, "device must be 'auto', 'cpu', 'cuda'"),
        ({"costs": {"device": "cpu"}}, "unknown field costs.device"),  # one top-level device now
        ({"baselines": {"methods": ["random"]}}, "baselines.methods[0] must be one of uniform_width"),
        (
            {"search": {"constraints": ["speed>=2x"]}},
            "search.constraints[0]: constraint 'speed>=2x': unknown metric 'speed'",
        ),
        ({"search": {"constraints": ["throughput<=2x"]}}, "throughput takes a lower bound"),
        (
            {"search": {"constraints": ["throughput>=fast"]}},
            "search.constraints[0]: constraint 'throughput>=fast' is not '<metric><op><value>",
        ),
        ({"search": {"constraints": ["memory<=2parsecs"]}}, "unknown unit 'parsecs' for memory"),
        ({"search": {"constraints": ["memory<=0GiB"]}}, "can never be met"),
        ({"gkd": {"weight_kl": 0, "weight_cosine": 0}}, "at least one loss weight must be > 0"),
        ({"bld": {"token_budget": 10**9}}, "bld.token_budget (1000000000) needs 7812500 sequences"),
    ],
)
def test_invalid_fields_are_named_with_the_fix(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in str(err.value)


def test_a_speed_constraint_no_child_of_the_library_can_meet_is_rejected(tiny_parent_factory) -> None:
    parent = str(tiny_parent_factory("llama"))  # 4 heads, 2 KV heads
    parent_only = {
        "kv_heads": [2],
        "attention_linear": False,
        "attention_noop": False,
        "ffn_fractions": [1.0],
        "ffn_linear": False,
        "ffn_noop": False,
    }
    with pytest.raises(ConfigError, match=r"search.constraints\[0\] 'throughput>=1.5x' is infeasible"):
        parse_config({"parent": parent, "library": parent_only})
    # One cheaper variant makes it feasible; KV-head counts are checked against the parent.
    parse_config({"parent": parent, "library": {**parent_only, "kv_heads": [2, 1]}})
    with pytest.raises(
        ConfigError, match=r"library.kv_heads\[0\] must divide the parent's 4 attention heads"
    ):
        parse_config({"parent": parent, "library": {"kv_heads": [3]}})


def test_bad_yaml_and_bad_overrides_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gkd: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_overrides({}, ["gkd.lr"])
    # A section the raw mapping leaves out starts from its defaults.
    assert apply_overrides({"gkd": {"lr": 1}}, ["gkd.lr=0.5", "tracking.uri=null"]) == {
        "gkd": {"lr": 0.5},
        "tracking": {"uri": None, "experiment": RunConfig().tracking.experiment},
    }
    # YAML 1.1 reads 2e-4 (no dot) as a string; a number field still takes it.
    assert load_config(None, [f"output={tmp_path}", "gkd.lr=2e-4"]).gkd.lr == 2e-4


def test_unreachable_storage_fails_at_load_time_naming_the_field(
    tmp_path: Path, s3_bucket: str, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ok = load_config(None, [f"output=s3://{s3_bucket}/runs/a", "tracking.uri=null"])
    assert ok.output == f"s3://{s3_bucket}/runs/a"
    with pytest.raises(
        ConfigError, match=r"output 's3://no-such-bucket-x/runs' is not reachable.*(not found|does not exist)"
    ):
        load_config(None, ["output=s3://no-such-bucket-x/runs", "tracking.uri=null"])
    with pytest.raises(
        ConfigError, match=r"tracking.uri 'run-dir' keeps a SQLite MLflow store under the output root"
    ):
        load_config(None, [f"output=s3://{s3_bucket}/runs/a"])
    with pytest.raises(ConfigError, match=r"data.source 's3://no-such-bucket-x/text' is not reachable"):
        load_config(None, [f"output={tmp_path}", "data.source=s3://no-such-bucket-x/text"])
    with pytest.raises(ConfigError, match=r"data.source '.*nothing-here' does not exist"):
        load_config(None, [f"output={tmp_path}", f"data.source={tmp_path / 'nothing-here'}"])


def test_unreachable_s3_endpoint_is_reported_as_the_output_field(tmp_path: Path, monkeypatch) -> None:
    from puzzle.io import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage._client_for.cache_clear()
    with pytest.raises(
        ConfigError, match=r"output 's3://b/p' is not reachable: cannot reach the S3 endpoint"
    ):
        load_config(None, ["output=s3://b/p", "tracking.uri=null"])
    storage._client_for.cache_clear()


def test_example_config_is_valid_and_every_field_is_documented(tmp_path: Path) -> None:
    example = load_config(str(ROOT / "configs" / "example.yaml"), [f"output={tmp_path}"], check_access=False)
    assert isinstance(example, RunConfig)
    docs = (ROOT / "docs" / "config.md").read_text()
    # configs/example.yaml is a real run's config holding only what differs from the default; the
    # embedded default (`puzzle run --print-config`) is the YAML that spells out every field (users copy it).
    printed = yaml.safe_load(RunConfig().to_yaml())
    for path in field_paths(RunConfig):
        assert f"`{path}`" in docs, f"docs/config.md does not document {path}"
        node = printed
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"`puzzle run --print-config` has no {path}"
            node = node[part]
    assert set(printed) == {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize(("flags", "hidden"), [([], True), (["-v"], False)])
def test_puzzle_run_hides_transformers_loading_bars_unless_verbose(
    flags: list[str], hidden: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`puzzle run` prints one line per phase and the phases' own progress bars; transformers'
    "Loading weights" bar (one per model a phase loads, through the hub's switch) only with -v."""
    import os

    from puzzle.cli import main

    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # restored (to unset) after the test
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    assert main([*flags, "run", "--print-config"]) == 0
    assert "output:" in capsys.readouterr().out
    assert (os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1") is hidden
