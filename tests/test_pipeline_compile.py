"""The compiled pipeline: committed, reproducible, and carrying the cluster settings it promises."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "pipelines" / "puzzle_pipeline.yaml"
GPU_TASKS = {"library", "bld", "costs", "scoring", "search", "realize", "gkd", "baselines", "evaluate"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.puzzle_pipeline import compile_pipeline

    return compile_pipeline(tmp_path_factory.mktemp("compiled") / "puzzle_pipeline.yaml")


@pytest.fixture(scope="module")
def docs(compiled: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    spec, platform = yaml.safe_load_all(compiled.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every task of every DAG: task name -> (the DAG component that holds it, task spec)."""
    out = {}
    for owner, component in [("root", spec["root"]), *spec["components"].items()]:
        for name, task in component.get("dag", {}).get("tasks", {}).items():
            out[name] = (owner, task)
    return out


def _executor(spec: dict[str, Any], task: dict[str, Any]) -> str:
    return spec["components"][task["componentRef"]["name"]]["executorLabel"]


def test_recompiling_gives_the_committed_file_byte_for_byte(compiled: Path) -> None:
    assert compiled.read_bytes() == COMMITTED.read_bytes(), (
        "pipelines/puzzle_pipeline.yaml is stale: run `puzzle pipeline compile` and commit the result"
    )


def test_bld_and_scoring_fan_out_with_bounded_parallelism(docs) -> None:
    from pipelines.puzzle_pipeline import PARALLELISM

    spec, _ = docs
    tasks = _tasks(spec)
    loops = {
        task["taskInfo"]["name"]: (name, task)
        for name, (_, task) in tasks.items()
        if "parameterIterator" in task
    }
    assert set(loops) == {
        "bld-shards",
        "scoring-shards",
    }  # the baselines run in one task, method after method
    for display, worker, fan_in in (
        ("bld-shards", "bld", "bld-merge"),
        ("scoring-shards", "scoring", "scoring-merge"),
    ):
        name, loop = loops[display]
        assert loop["iteratorPolicy"]["parallelismLimit"] == PARALLELISM
        # The items are the fan-out plan's output, i.e. from a run parameter, not a fixed list.
        plan_task = loop["inputs"]["parameters"][loop["parameterIterator"]["items"]["inputParameter"]]
        assert tasks[plan_task["taskOutputParameter"]["producerTask"]][1]["componentRef"]["name"].startswith(
            "comp-fan-out"
        )
        assert worker in spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
        # Fan-in: the merge step (or the evaluation) takes the loop's collected outputs.
        collectors = [
            task_name
            for task_name, (_, t) in tasks.items()
            if any(
                a.get("taskOutputArtifact", {}).get("producerTask") == name
                for a in t.get("inputs", {}).get("artifacts", {}).values()
            )
        ]
        assert collectors == [fan_in], f"{display} is collected by {collectors}"


def test_gpu_steps_request_gpus_and_only_they_do(docs) -> None:
    spec, executors = docs
    tasks = _tasks(spec)
    for name, (_, task) in tasks.items():
        if "componentRef" not in task or "dag" in spec["components"][task["componentRef"]["name"]]:
            continue
        label = _executor(spec, task)
        resources = spec["deploymentSpec"]["executors"][label]["container"].get("resources", {})
        accelerator = resources.get("accelerator")
        if name in GPU_TASKS:
            assert accelerator and accelerator["resourceType"] == "nvidia.com/gpu", name
            assert "gpu" in spec["deploymentSpec"]["executors"][label]["container"]["image"]
            platform = executors[label]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in platform[
                "tolerations"
            ]
            assert {
                "medium": "Memory",
                "mountPath": "/dev/shm",
                "sizeLimit": "16Gi",
                "volumeName": "dshm",
            } in platform["emptyDirMounts"]
        else:
            assert accelerator is None, f"{name} is a CPU step but requests {accelerator}"
    gkd = spec["deploymentSpec"]["executors"]["exec-gkd"]["container"]["resources"]["accelerator"]
    assert gkd["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gkd-plan-Output']}}"


def test_costs_and_speed_are_measured_on_the_target_gpu_product(docs) -> None:
    spec, executors = docs
    pinned = {label for label, e in executors.items() if "nodeSelector" in e}
    assert pinned == {"exec-costs", "exec-search", "exec-evaluate"}
    for label in pinned:
        assert executors[label]["nodeSelector"]["nodeSelectorJson"] == {
            "componentInputParameter": "pipelinechannel--gpu_node_selector"
        }
    default = spec["root"]["inputDefinitions"]["parameters"]["gpu_node_selector"]["defaultValue"]
    assert default == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_every_step_gets_s3_and_mlflow_credentials_from_secrets(docs) -> None:
    spec, executors = docs
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for label, platform in executors.items():
        # Inside a sub-DAG a run parameter is "pipelinechannel--<name>", at the root just "<name>".
        secrets = {
            s["secretNameParameter"]["componentInputParameter"].removeprefix("pipelinechannel--"): s
            for s in platform["secretAsEnv"]
        }
        s3 = secrets["s3_secret"]
        assert {m["envVar"] for m in s3["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, label
        mlflow = secrets["mlflow_secret"]
        assert "MLFLOW_TRACKING_TOKEN" in {m["envVar"] for m in mlflow["keyToEnv"]}
        (settings,) = platform["configMapAsEnv"]
        assert {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"} <= {m["envVar"] for m in settings["keyToEnv"]}
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["s3_secret"]["defaultValue"] == "puzzle-s3"
    assert params["mlflow_secret"]["defaultValue"] == "puzzle-mlflow"


def test_gpu_steps_retry_with_backoff_and_cpu_steps_do_not(docs) -> None:
    spec, _ = docs
    for name, (_, task) in _tasks(spec).items():
        if name in GPU_TASKS:
            assert task["retryPolicy"] == {
                "maxRetryCount": 3,
                "backoffDuration": "60s",
                "backoffFactor": 2.0,
                "backoffMaxDuration": "3600s",
            }, name
        else:
            assert "retryPolicy" not in task, name


def test_caching_is_on_except_for_steps_with_side_effects(docs) -> None:
    spec, _ = docs
    for name, (_, task) in _tasks(spec).items():
        if "componentRef" not in task or "dag" in spec["components"][task["componentRef"]["name"]]:
            continue
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (name not in {"register", "promote", "record-outcome"}), name


def test_registration_and_promotion_are_gated_on_the_evaluation(docs) -> None:
    spec, _ = docs
    tasks = _tasks(spec)
    conditions = {
        t["taskInfo"]["name"]: (name, t)
        for name, (_, t) in tasks.items()
        if "triggerPolicy" in t and "condition" in t["triggerPolicy"]
    }
    assert set(conditions) == {"gate"}
    name, gate = conditions["gate"]
    # register says whether the evaluation meets the gates (False without registry.model_name).
    assert (
        gate["triggerPolicy"]["condition"]
        == "inputs.parameter_values['pipelinechannel--register-Output'] == true"
    )
    assert gate["inputs"]["parameters"]["pipelinechannel--register-Output"] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "register"}
    }
    # register reads the export and the evaluation; promote sits behind the gate, on register's version.
    owner = {task_name: o for task_name, (o, _) in tasks.items()}
    register = tasks["register"][1]
    assert {a["taskOutputArtifact"]["producerTask"] for a in register["inputs"]["artifacts"].values()} == {
        "export",
        "evaluate",
    }
    assert owner["register"] == owner[name] == "comp-exit-handler-1"
    assert owner["promote"] == gate["componentRef"]["name"]
    promote = tasks["promote"][1]
    # promote finds the version of the export it is given by the export's content hash
    assert promote["inputs"]["artifacts"]["export"] == {
        "componentInputArtifact": "pipelinechannel--export-export"
    }
    assert gate["inputs"]["artifacts"]["pipelinechannel--export-export"] == {
        "taskOutputArtifact": {"outputArtifactKey": "export", "producerTask": "export"}
    }


def test_an_exit_handler_records_the_outcome_whatever_happens(docs) -> None:
    spec, _ = docs
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "record-outcome"}
    outcome = root["record-outcome"]
    assert outcome["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert outcome["inputs"]["parameters"]["status"] == {
        "taskFinalStatus": {"producerTask": "exit-handler-1"}
    }
    assert outcome["inputs"]["parameters"]["kfp_run_id"] == {
        "runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}
    }


def test_every_component_runs_our_images_without_installing_kfp(docs) -> None:
    from components.images import CPU_IMAGE, GPU_IMAGE, image

    spec, _ = docs
    for label, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] in {image(CPU_IMAGE), image(GPU_IMAGE)}, label
        assert "pip install" not in " ".join(container["command"]), label


def test_parameters_mirror_the_run_config_with_its_defaults(docs) -> None:
    from pipelines.parameters import config_parameters
    from pipelines.puzzle_pipeline import CLUSTER_PARAMETERS
    from puzzle.config import load_config

    spec, _ = docs
    params = spec["root"]["inputDefinitions"]["parameters"]
    cluster = {name: default for name, (_, default, _) in CLUSTER_PARAMETERS.items()}
    expected = {**config_parameters(load_config(None, check_access=False)), **cluster}
    assert set(params) == set(expected)
    for name, value in expected.items():
        default = params[name].get("defaultValue")
        assert default == value, (
            f"pipeline parameter {name} defaults to {default!r}, the embedded config to {value!r}"
        )


def test_every_component_has_an_up_to_date_readme_and_both_tests() -> None:
    from components._readme import component_folders, load_component, render

    folders = component_folders()
    assert len(folders) >= 17
    for folder in folders:
        for name in ("README.md", "test_component_unit.py", "test_component_local.py"):
            assert (folder / name).is_file(), f"{folder.name}/{name} is missing"
        assert (folder / "README.md").read_text() == render(load_component(folder)), (
            f"components/{folder.name}/README.md is stale: run `python -m components._readme`"
        )


def test_gkd_gets_gkd_gpus_in_its_pod_or_none_when_it_drives_a_multi_node_trainjob(docs) -> None:
    """gkd_plan reads gkd.nodes at run time: the GKD pod requests gkd_gpus GPUs, or 0 when the step
    runs a Kubeflow Trainer TrainJob (whose pods request them); the step is retried (it re-attaches)."""
    spec, _ = docs
    tasks = _tasks(spec)
    _, gkd = tasks["gkd"]
    plan_input = gkd["inputs"]["parameters"]["pipelinechannel--gkd-plan-Output"]["taskOutputParameter"]
    assert plan_input == {"producerTask": "gkd-plan", "outputParameterKey": "Output"}
    _, plan = tasks["gkd-plan"]
    assert plan["inputs"]["parameters"]["gpus"]["componentInputParameter"] == "pipelinechannel--gkd_gpus"
    assert plan["inputs"]["parameters"]["gkd_config"]["componentInputParameter"] == "pipelinechannel--gkd"
    params = gkd["inputs"]["parameters"]
    for name, run_parameter in (
        ("trainer_runtime", "gkd_trainer_runtime"),
        ("s3_secret", "s3_secret"),
        ("mlflow_secret", "mlflow_secret"),
        ("env_config_map", "env_config_map"),
        ("gpus", "gkd_gpus"),
    ):
        assert params[name]["componentInputParameter"] == f"pipelinechannel--{run_parameter}", name
    default = spec["root"]["inputDefinitions"]["parameters"]["gkd_trainer_runtime"]["defaultValue"]
    assert default == "torch-distributed"


def test_a_nemo_pipeline_runs_only_its_gkd_step_in_the_nemo_image(tmp_path: Path) -> None:
    from components.images import CPU_IMAGE, GPU_IMAGE, NEMO_IMAGE, image
    from pipelines.client import PipelineCLIError, check_gkd_image
    from puzzle.cli import main
    from puzzle.config import parse_config

    out = tmp_path / "nemo.yaml"
    assert main(["pipeline", "compile", "--gkd-backend", "nemo", "--out", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    images = {k: e["container"]["image"] for k, e in spec["deploymentSpec"]["executors"].items()}
    assert images.pop("exec-gkd") == image(NEMO_IMAGE)
    assert set(images.values()) <= {image(CPU_IMAGE), image(GPU_IMAGE)}
    assert spec["root"]["inputDefinitions"]["parameters"]["gkd"]["defaultValue"]["backend"] == "nemo"

    nemo = parse_config({"gkd": {"backend": "nemo"}})
    check_gkd_image(nemo, out)
    check_gkd_image(parse_config({}), out)  # a torch run may use either
    refused = r"gkd.backend is 'nemo' but the GKD step .*--gkd-backend nemo"
    with pytest.raises(PipelineCLIError, match=refused):
        check_gkd_image(nemo, COMMITTED)
