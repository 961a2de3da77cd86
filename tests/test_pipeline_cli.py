"""`puzzle pipeline`: bad parameters fail before KFP is contacted, with the field and the fix named;
upload and schedule are idempotent (checked against a recording stand-in for ``kfp.Client``)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from puzzle.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    directory = tmp_path / "profiles"
    directory.mkdir()
    (directory / "default.yaml").write_text(yaml.safe_dump({"parent": "s3://models/llama"}))
    (directory / "fast.yaml").write_text(
        yaml.safe_dump({"parent": "s3://models/llama", "search": {"constraints": ["throughput>=2x"]}})
    )
    return directory


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_profile_names_the_known_ones(capsys, profiles: Path) -> None:
    err = _fails(
        capsys,
        [
            "pipeline",
            "submit",
            "--profile",
            "fastest",
            "--profiles-dir",
            str(profiles),
            "--host",
            "http://127.0.0.1:1",
        ],
    )
    assert "unknown profile 'fastest'" in err and "default, fast" in err


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 3 * * 0", "has 5 fields; KFP needs six, seconds first"),
        ("0 0 3 * * 0 1", "has 7 fields"),
        ("0 61 * * * *", "minutes field '61' is out of range 0-59"),
        ("0 0 25 * * *", "hours field '25' is out of range 0-23"),
        ("0 0 3 * * MOON", "day of week field 'MOON' is not a number or a name"),
        ("0 0 3 ? * *", None),  # '?' is fine in day of month
        ("0 */0 * * * *", "step that is not a positive integer"),
        ("0 0 5-2 * * *", "descending range"),
        ("", "has 0 fields"),
    ],
)
def test_malformed_cron_is_refused_before_connecting(capsys, cron: str, message: str | None) -> None:
    from pipelines.client import validate_cron

    if message is None:
        assert validate_cron(cron) == cron
        return
    # The host is unreachable: the cron must be refused before any connection is tried.
    err = _fails(
        capsys, ["pipeline", "schedule", "--name", "nightly", "--cron", cron, "--host", "http://127.0.0.1:1"]
    )
    assert message in err


@pytest.mark.parametrize(
    "cron", ["0 0 3 * * 0", "0 0 3 * * SUN", "30 */15 8-18 1,15 JAN-JUN MON-FRI", "@daily", "@every 6h"]
)
def test_valid_cron_expressions_pass(cron: str) -> None:
    from pipelines.client import validate_cron

    assert validate_cron(cron) == cron


def test_unreachable_host_fails_fast_with_the_url(capsys) -> None:
    host = f"http://127.0.0.1:{_closed_port()}"
    err = _fails(capsys, ["pipeline", "submit", "--host", host, "--set", "parent=s3://models/llama"])
    assert f"KFP API at {host} is not reachable" in err and "--host" in err


def test_missing_host_says_how_to_set_it(capsys, monkeypatch) -> None:
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    err = _fails(capsys, ["pipeline", "upload"])
    assert "KF_PIPELINES_ENDPOINT" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "bld.lrr=0.1"], "unknown field bld.lrr"),
        (["--set", "parent=./my-model"], "is a local path, which the pipeline's pods cannot read"),
        (["--set", "parent=s3://m/p", "--serving-uri", "/srv/models"], "--serving-uri must be s3://"),
        (["--config", "/no/such/config.yaml"], "cannot read config file /no/such/config.yaml"),
    ],
)
def test_bad_run_parameters_are_refused_before_connecting(capsys, argv: list[str], message: str) -> None:
    err = _fails(capsys, ["pipeline", "submit", "--host", "http://127.0.0.1:1", *argv])
    assert message in err


def test_config_maps_to_every_pipeline_parameter(profiles: Path) -> None:
    from pipelines.client import load_run_config
    from pipelines.parameters import pipeline_arguments
    from pipelines.puzzle_pipeline import PIPELINE_FILE

    config = load_run_config(profile="fast", profiles_dir=str(profiles), overrides=["bld.shards=4"])
    arguments = pipeline_arguments(
        config, serving_uri="s3://serving/child", gpu_product="NVIDIA-H200", profile="fast"
    )
    spec = next(yaml.safe_load_all(PIPELINE_FILE.read_text()))
    assert set(arguments) == set(spec["root"]["inputDefinitions"]["parameters"])
    assert arguments["search"]["constraints"] == ["throughput>=2x"]
    assert arguments["bld"]["shards"] == 4 and arguments["parent"] == "s3://models/llama"
    assert arguments["gpu_node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    # KFP values cannot be null: null fields are left out, and the components read them as null.
    assert "kv_heads" not in arguments["library"]  # null: every divisor
    assert "model_name" not in arguments["registry"]  # null: not registered


def test_compile_writes_the_committed_pipeline(capsys, tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--out", str(out)]) == 0
    assert out.read_bytes() == (ROOT / "pipelines" / "puzzle_pipeline.yaml").read_bytes()


def test_token_path_prefers_the_projected_kfp_token(tmp_path: Path, monkeypatch) -> None:
    from pipelines.client import PipelineCLIError, token_path

    token = tmp_path / "token"
    token.write_text("eyJ...")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    assert token_path() == str(token)
    with pytest.raises(PipelineCLIError, match="does not exist"):
        token_path(str(tmp_path / "missing"))


def test_the_puzzle_package_never_imports_kfp() -> None:
    code = (
        "import sys; from puzzle.cli import build_parser; build_parser(); "
        "import puzzle.run, puzzle.config, puzzle.mlflow.tracking, puzzle.mlflow.registry; "
        "assert not [m for m in sys.modules if m == 'kfp' or m.startswith('kfp.')], 'kfp imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- idempotency


class RecordingKfp:
    """Just enough of ``kfp.Client`` for upload/schedule, remembering what was created."""

    def __init__(self) -> None:
        self.pipelines: dict[str, str] = {}
        self.versions: dict[str, list[Any]] = {}
        self.recurring: dict[str, Any] = {}
        self.calls: list[str] = []

    def get_pipeline_id(self, name: str) -> str | None:
        return self.pipelines.get(name)

    def upload_pipeline(self, path: str, pipeline_name: str, description: str) -> Any:
        self.calls.append("upload_pipeline")
        self.pipelines[pipeline_name] = f"p-{pipeline_name}"
        self.versions[f"p-{pipeline_name}"] = [
            SimpleNamespace(display_name=pipeline_name, pipeline_version_id="v0")
        ]
        return SimpleNamespace(pipeline_id=f"p-{pipeline_name}")

    def list_pipeline_versions(
        self, pipeline_id: str, page_size: int = 10, sort_by: str = "", filter: str | None = None
    ) -> Any:
        versions = self.versions.get(pipeline_id, [])
        return SimpleNamespace(pipeline_versions=list(reversed(versions)) if sort_by else versions)

    def upload_pipeline_version(self, path: str, pipeline_version_name: str, pipeline_id: str) -> Any:
        self.calls.append("upload_pipeline_version")
        version = SimpleNamespace(
            display_name=pipeline_version_name, pipeline_version_id=f"v{len(self.versions[pipeline_id])}"
        )
        self.versions[pipeline_id].append(version)
        return version

    def create_experiment(self, name: str, namespace: str | None = None) -> Any:
        return SimpleNamespace(experiment_id=f"e-{name}")

    def list_recurring_runs(
        self, experiment_id: str, namespace: str | None, page_size: int, filter: str
    ) -> Any:
        return SimpleNamespace(recurring_runs=list(self.recurring.values()))

    def delete_recurring_run(self, recurring_run_id: str) -> None:
        self.calls.append("delete_recurring_run")
        self.recurring = {k: v for k, v in self.recurring.items() if v.recurring_run_id != recurring_run_id}

    def create_recurring_run(self, **kwargs: Any) -> Any:
        self.calls.append("create_recurring_run")
        run = SimpleNamespace(
            recurring_run_id=f"r{len(self.calls)}",
            display_name=kwargs["job_name"],
            description=kwargs["description"],
            trigger=SimpleNamespace(cron_schedule=SimpleNamespace(cron=kwargs["cron_expression"])),
            max_concurrency=str(kwargs["max_concurrency"]),  # the API returns int64 as a string
            no_catchup=kwargs["no_catchup"],
            runtime_config=SimpleNamespace(
                parameters=kwargs["params"], pipeline_root=kwargs["pipeline_root"]
            ),
            pipeline_version_reference=SimpleNamespace(
                pipeline_id=kwargs["pipeline_id"], pipeline_version_id=kwargs["version_id"]
            ),
        )
        self.recurring[run.display_name] = run
        return run


def test_upload_is_idempotent_per_version() -> None:
    from pipelines.client import upload
    from pipelines.puzzle_pipeline import PIPELINE_FILE

    client = RecordingKfp()
    first = upload(client, PIPELINE_FILE, name="puzzle", version="0.1.0-r1")
    again = upload(client, PIPELINE_FILE, name="puzzle", version="0.1.0-r1")
    newer = upload(client, PIPELINE_FILE, name="puzzle", version="0.1.0-r2")
    assert first.created and not again.created and newer.created
    assert again.version_id == first.version_id != newer.version_id
    assert client.calls == ["upload_pipeline", "upload_pipeline_version", "upload_pipeline_version"]


def test_schedule_creates_then_leaves_alone_then_replaces_by_name() -> None:
    from pipelines.client import latest_version, schedule
    from pipelines.parameters import pipeline_arguments
    from puzzle.config import load_config

    client = RecordingKfp()
    client.pipelines["puzzle"] = "p-puzzle"
    client.versions["p-puzzle"] = [SimpleNamespace(display_name="0.1.0-r1", pipeline_version_id="v1")]
    config = load_config(None, ["parent=s3://models/llama", "output=s3://runs/puzzle"], check_access=False)
    pipeline_id, version_id = latest_version(client, "puzzle")

    def apply(cron: str) -> str:
        return schedule(
            client,
            config,
            pipeline_arguments(config),
            name="puzzle-weekly",
            cron=cron,
            experiment="puzzle",
            pipeline_id=pipeline_id,
            version_id=version_id,
            max_concurrency=1,
            no_catchup=True,
        ).action

    assert apply("0 0 3 * * 0") == "created"
    assert apply("0 0 3 * * 0") == "unchanged"
    assert apply("0 30 4 * * 1") == "updated"
    assert len(client.recurring) == 1
    run = client.recurring["puzzle-weekly"]
    assert run.trigger.cron_schedule.cron == "0 30 4 * * 1" and run.no_catchup is True
    assert run.runtime_config.pipeline_root == "s3://runs/puzzle"
    assert client.calls == ["create_recurring_run", "delete_recurring_run", "create_recurring_run"]


def test_submit_sends_the_config_as_arguments_and_its_output_as_pipeline_root() -> None:
    from pipelines.client import submit
    from pipelines.parameters import pipeline_arguments
    from pipelines.puzzle_pipeline import PIPELINE_FILE
    from puzzle.config import load_config

    calls: list[dict[str, Any]] = []

    class Client:
        def create_run_from_pipeline_package(self, path: str, **kwargs: Any) -> Any:
            calls.append({"path": path, **kwargs})
            return SimpleNamespace(run_id="run-1")

    config = load_config(None, ["parent=models:/llama/3", "output=s3://runs/a"], check_access=False)
    arguments = pipeline_arguments(config, serving_uri="s3://serving/a")
    run_id = submit(
        Client(), config, arguments, package=PIPELINE_FILE, experiment="puzzle", namespace="team-a"
    )

    assert run_id == "run-1"
    (call,) = calls
    assert (
        call["arguments"]["parent"] == "models:/llama/3"
        and call["arguments"]["serving_uri"] == "s3://serving/a"
    )
    assert call["pipeline_root"] == "s3://runs/a" and call["namespace"] == "team-a"
    assert call["run_name"].startswith(f"puzzle-{config.digest}-")


def test_images_come_from_images_yaml_and_pin_digests(tmp_path: Path) -> None:
    from components.images import ImageConfigError, image

    path = tmp_path / "images.yaml"
    digest = "sha256:" + "a" * 64
    path.write_text(
        yaml.safe_dump(
            {
                "registry": "registry.example/puzzle",
                "version": "1.2.3",
                "images": {
                    "gpu": {"name": "puzzle-gpu", "digest": digest},
                    "cpu": {"name": "puzzle-cpu"},
                    "bad": {"name": "x", "digest": "latest"},
                },
            }
        )
    )
    assert image("gpu", path) == f"registry.example/puzzle/puzzle-gpu:1.2.3@{digest}"
    assert image("cpu", path) == "registry.example/puzzle/puzzle-cpu:1.2.3"
    with pytest.raises(ImageConfigError, match="no image for role 'tpu'"):
        image("tpu", path)
    with pytest.raises(ImageConfigError, match="digest must look like sha256"):
        image("bad", path)
