"""Fault and attack tests (issue 16): what broke when we tried to break it stays fixed.

One test (or a few) per finding, against the real SeaweedFS S3 and MLflow servers of the shared
fixtures where the finding is about them:

1. malicious manifests and S3 keys (absolute, ``..``, backslash, symlink) never write outside
   the cache; 2. ``--out`` over a user's folder or a file is refused before any work;
3. a parent replaced in place on S3 is downloaded again; 4. the trigger runs a (version, profile)
once, and a rejected request leaves the run in flight alone; 5. files a manifest does not list are
refused; 6. non-finite settings and gate targets are refused; 7. a YAML alias bomb is refused fast
in little memory; 8. resume checkpoints load without pickle; 9. the trigger server bounds slow,
idle and bursty clients; 10. the smaller ones; 11. the chart's defaults.
(12, the webhook end-to-end test, waits for MLflow's webhook cache with a warm-up event:
``tests/test_trigger.py``.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import test_trigger as trig
import yaml

from puzzle.io import artifacts, storage
from puzzle.io.artifacts import ArtifactError, Manifest

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def _put_artifact(
    client: Any, bucket: str, prefix: str, files: dict[str, bytes], kind: str = "tokens"
) -> str:
    """An S3 artifact whose manifest lists ``files`` (names as given, however hostile) with their
    true checksums, each object uploaded where ``storage.join`` puts that name."""
    uri = f"s3://{bucket}/{prefix}"
    listed = {}
    for name, data in files.items():
        _, key = storage.split_s3(storage.join(uri, name))
        if ".." not in name.split("/") and "\\" not in name:  # keys SeaweedFS stores
            client.put_object(Bucket=bucket, Key=key, Body=data)
        listed[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = {
        "kind": kind,
        "files": listed,
        "schema_version": 1,
        "inputs": {},
        "parameters": {},
        "summary": {},
    }
    client.put_object(Bucket=bucket, Key=f"{prefix}/manifest.json", Body=json.dumps(manifest).encode())
    return uri


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _main(argv: list[str], capsys) -> tuple[int, str]:
    from puzzle.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# --------------------------------------------------------------------------- 1. path safety


@pytest.mark.integration
@pytest.mark.parametrize(
    "name",
    ["ABSOLUTE", "../../escape-{id}.txt", "..\\..\\escape-{id}.txt", "ok/../../escape-{id}.txt"],
    ids=["absolute", "dotdot", "backslash", "inner-dotdot"],
)
def test_a_malicious_s3_manifest_never_writes_outside_the_cache(
    s3_server, s3_bucket: str, tmp_path: Path, monkeypatch, name: str
) -> None:
    token = uuid.uuid4().hex[:8]
    target = tmp_path / f"pwned-{token}.txt"
    name = str(target) if name == "ABSOLUTE" else name.format(id=token)
    uri = _put_artifact(s3_server.client(), s3_bucket, "evil", {"data.txt": b"fine", name: b"owned"})
    downloads: list[str] = []
    real = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda u, d: (downloads.append(str(d)), real(u, d)))
    with pytest.raises(ArtifactError, match="refusing the file name"):
        artifacts.materialize(uri)
    assert downloads == [], "nothing may be downloaded from a manifest with an unsafe name"
    assert not target.exists()
    assert not list(storage.cache_root().rglob(f"*escape-{token}*"))


@pytest.mark.integration
def test_a_symlink_planted_in_the_cache_is_not_followed(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    uri = _put_artifact(s3_server.client(), s3_bucket, "art", {"sub/file.txt": b"payload"})
    manifest = artifacts.read_manifest(uri)
    assert manifest is not None
    cache = storage.cache_dir_for(f"{uri}#{manifest.content_hash}", "artifacts")
    outside = tmp_path / "outside"
    outside.mkdir()
    (cache / "sub").symlink_to(outside, target_is_directory=True)  # planted before the download
    local = artifacts.materialize(uri)
    assert not (outside / "file.txt").exists(), "the download followed a planted symlink"
    assert (local / "sub").is_dir() and not (local / "sub").is_symlink()
    assert (local / "sub" / "file.txt").read_bytes() == b"payload"


def test_a_symlinked_file_in_a_local_artifact_is_refused(tiny_parent: Path, tmp_path: Path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----\n")
    art = tmp_path / "parent"
    shutil.copytree(tiny_parent, art)
    tokenizer = art / "tokenizer.json"
    tokenizer.unlink()
    tokenizer.symlink_to(secret)
    data = json.loads((art / "manifest.json").read_text())
    data["files"]["tokenizer.json"] = {"sha256": storage.sha256_file(secret), "size": secret.stat().st_size}
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="symbolic link"):
        artifacts.materialize(str(art), "parent")


@pytest.mark.integration
@pytest.mark.parametrize("key", ["../../escape.txt", "..\\..\\escape.txt", "a/./b.txt"])
def test_s3_parent_keys_that_leave_the_cache_are_refused(
    s3_server, s3_bucket: str, monkeypatch, key: str
) -> None:
    """AWS S3 allows '..' in keys (SeaweedFS does not store them, so the listing is stubbed)."""
    from puzzle.parent import _download_s3

    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="p/config.json", Body=b"{}")
    listed = ["config.json", key]
    monkeypatch.setattr(storage, "list_files", lambda uri: listed)
    monkeypatch.setattr(storage, "list_objects", lambda uri: [(rel, 2, '"e"') for rel in listed])
    downloads: list[str] = []
    monkeypatch.setattr(storage, "download_file", lambda uri, dest: downloads.append(str(dest)))
    with pytest.raises(storage.StorageError, match="refusing the file name"):
        _download_s3(f"s3://{s3_bucket}/p")
    assert downloads == []


# --------------------------------------------------------------------------- 2. publish rule


def test_out_over_a_user_folder_is_refused_before_any_work(tiny_parent: Path, tmp_path: Path, capsys) -> None:
    project = tmp_path / "my-project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('my work')\n")
    (project / "notes.md").write_text("do not delete\n")
    before = _tree(project)
    started = time.perf_counter()
    code, text = _main(["export", str(tiny_parent), "--out", str(project)], capsys)
    assert code == 2 and "not a puzzle artifact" in text and "nothing was changed" in text, text
    assert time.perf_counter() - started < 5
    assert _tree(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-project"]  # no .partial, no hidden copy


def test_out_over_a_file_is_refused_and_the_file_left_alone(
    tiny_parent: Path, tmp_path: Path, capsys
) -> None:
    victim = tmp_path / "thesis.tex"
    victim.write_text("\\documentclass{article}\n")
    code, text = _main(["export", str(tiny_parent), "--out", str(victim)], capsys)
    assert code == 2 and "existing file" in text, text
    assert victim.read_text() == "\\documentclass{article}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]  # no .thesis.tex.old-PID


def test_out_over_an_artifact_of_another_kind_is_refused(tiny_parent: Path, tmp_path: Path) -> None:
    from puzzle.child.export import export
    from puzzle.config import ExportConfig

    other = tmp_path / "tokens-art"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(Manifest(kind="tokens").to_json()))
    with pytest.raises(ArtifactError, match="holds a 'tokens' artifact"):
        export(str(tiny_parent), str(other), ExportConfig())


def test_puzzle_run_check_reports_an_output_that_would_replace_a_user_folder(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    (root / "parent").mkdir(parents=True)
    (root / "parent" / "weights-i-downloaded.bin").write_bytes(b"\0" * 16)
    code, text = _main(["run", "--check", "--set", f"output={root}", "--set", "tracking.uri=null"], capsys)
    assert code == 2 and f"{root / 'parent'}" in text and "not a puzzle artifact" in text, text
    assert (root / "parent" / "weights-i-downloaded.bin").exists()


# --------------------------------------------------------------------------- 3. stale S3 parent


def _upload_dir(client: Any, bucket: str, prefix: str, directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory)}")


@pytest.mark.integration
def test_a_parent_replaced_in_place_on_s3_is_downloaded_again(
    s3_server, s3_bucket: str, tiny_parent_factory, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from puzzle.parent import convert

    client = s3_server.client()
    first, second = tiny_parent_factory("llama", seed=0), tiny_parent_factory("llama", seed=11)
    uri = f"s3://{s3_bucket}/parents/tiny"
    _upload_dir(client, s3_bucket, "parents/tiny", first)
    out = tmp_path / "parent"
    one = convert(uri, str(out))
    _upload_dir(client, s3_bucket, "parents/tiny", second)  # the same keys, new weights
    two = convert(uri, str(out))
    assert one.inputs["parent"]["hash"] != two.inputs["parent"]["hash"]
    converted = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert converted.equal(load_file(second / "model.safetensors")["model.embed_tokens.weight"])
    assert not converted.equal(load_file(first / "model.safetensors")["model.embed_tokens.weight"])


# --------------------------------------------------------------------------- 4. trigger: once per version


@pytest.fixture
def profile_service(mlflow_server, monkeypatch, tmp_path: Path):
    from pipelines.trigger import build_service
    from pipelines.trigger.server import TriggerServer
    from pipelines.trigger.settings import TriggerSettings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("fast", "other"):
        (profiles / f"{name}.yaml").write_text("search: {constraints: ['throughput>=2x']}\n")
    settings = TriggerSettings(
        tracking_uri=mlflow_server.url,
        secret=trig.SECRET,
        state_db=str(tmp_path / "state.sqlite"),
        profiles_dir=str(profiles),
        reconcile_interval_s=0,
    )
    backend = trig.RecordingBackend()
    service = build_service(settings, backend)
    server = TriggerServer(service, "127.0.0.1", 0).start()
    yield service, backend, server
    server.stop()


def _request(server: Any, name: str, version: str, profile: str) -> dict:
    body = trig.tag_event(name, version, "puzzle.request", profile)
    status, payload = trig.post(server.port, body, trig.signed(body))
    assert status == 200, payload
    return payload


@pytest.mark.integration
@pytest.mark.parametrize("between", ["no-such-profile", "other"])
def test_a_profile_runs_once_per_version_whatever_is_requested_in_between(
    profile_service, mlflow_server, tiny_parent_factory, between: str
) -> None:
    from pipelines.trigger.settings import TAG_ERROR, TAG_PROFILE, TAG_RUN_ID, TAG_STATE

    service, backend, server = profile_service
    name = f"once-{uuid.uuid4().hex[:6]}"
    version = trig.register_parent(tiny_parent_factory("llama"), name)
    assert _request(server, name, version, "fast")["status"] == "submitted"
    in_flight = dict(service.client.get_model_version(name, version).tags)
    middle = _request(server, name, version, between)
    again = _request(server, name, version, "fast")
    assert again["status"] == "already_requested", again
    profiles = [r.profile for r in backend.requests]
    assert profiles.count("fast") == 1, profiles
    tags = service.client.get_model_version(name, version).tags
    if between == "no-such-profile":
        assert middle["status"] == "rejected" and profiles == ["fast"]
        # The rejection did not touch the state tags of the run in flight; it says why, apart.
        for key in (TAG_PROFILE, TAG_STATE, TAG_RUN_ID):
            assert tags[key] == in_flight[key], key
        assert "no-such-profile" in tags[TAG_ERROR]
    else:
        assert middle["status"] == "submitted" and profiles == ["fast", "other"]
    # What the reconcile loop does for a version tagged puzzle.request=fast: nothing more.
    assert service.request(name, version, "fast", source="reconcile", retry_failed=False)["status"] == (
        "already_requested"
    )
    assert [r.profile for r in backend.requests].count("fast") == 1


# --------------------------------------------------------------------------- 5. unlisted files


@pytest.mark.parametrize("injected", ["chat_template.jinja", "added_tokens.json"])
def test_files_a_manifest_does_not_list_are_refused(
    tiny_parent: Path, tmp_path: Path, injected: str, capsys
) -> None:
    art = tmp_path / "parent"
    shutil.copytree(tiny_parent, art)
    (art / injected).write_text('{"<|im_start|>": 1}' if injected.endswith(".json") else "{{ evil }}")
    with pytest.raises(ArtifactError, match=f"{injected} is not listed in manifest.json"):
        artifacts.materialize(str(art), "parent")
    code, text = _main(["export", str(art), "--out", str(tmp_path / "export")], capsys)
    assert code == 2 and injected in text and not (tmp_path / "export").exists(), text


@pytest.mark.integration
def test_objects_an_s3_manifest_does_not_list_are_refused(s3_server, s3_bucket: str) -> None:
    client = s3_server.client()
    uri = _put_artifact(client, s3_bucket, "toks", {"splits.json": b"{}"})
    client.put_object(Bucket=s3_bucket, Key="toks/chat_template.jinja", Body=b"{{ evil }}")
    with pytest.raises(ArtifactError, match="chat_template.jinja is not listed"):
        artifacts.materialize(uri)


# --------------------------------------------------------------------------- 6. non-finite values


def _float_fields() -> list[str]:
    """Every config field that holds a float (alone, optional or in a list), by dotted path."""
    from puzzle.config import describe_section, section_names, section_type

    paths = []
    for section in section_names():
        for path, tname, default, _doc in describe_section(section_type(section), section):
            if "number" in tname:
                paths.append(f"{path}[0]" if tname.startswith("list") and default else path)
    return paths


FLOAT_FIELDS = _float_fields()


def test_every_float_setting_is_found() -> None:
    assert {"gkd.lr", "bld.lr", "gkd.weight_kl", "registry.gates.min_speedup", "search.alpha"} <= set(
        FLOAT_FIELDS
    )
    assert "library.ffn_fractions[0]" in FLOAT_FIELDS


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400"])
@pytest.mark.parametrize("path", FLOAT_FIELDS)
def test_non_finite_values_are_refused_everywhere_in_the_config(path: str, value: str) -> None:
    from puzzle.config import ConfigError, RunConfig, apply_overrides, parse_config

    field, _, index = path.partition("[")
    raw = f"[{value}]" if index else value
    data = apply_overrides({}, [f"{field}={raw}"], base=RunConfig().to_dict())
    with pytest.raises(ConfigError, match=re.escape(field) + ".*(finite|must be)"):
        parse_config(data)


@pytest.mark.integration
@pytest.mark.parametrize(
    "targets", [(float("nan"), 0.0), (float("-inf"), float("-inf")), (0.5, float("nan"))]
)
def test_the_gate_refuses_non_finite_targets_and_figures(mlflow_server, targets: tuple[float, float]) -> None:
    from mlflow import MlflowClient

    from puzzle.mlflow import registry

    client = MlflowClient(mlflow_server.url)
    name = f"gate-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    mv = client.create_model_version(
        name,
        source="s3://nowhere/model",
        tags={registry.TAG_ACCURACY_KEPT: "0.1", registry.TAG_SPEEDUP: "0.5"},
    )
    with pytest.raises(registry.RegistryError, match="finite"):
        registry.promote(
            name,
            mv.version,
            min_accuracy_kept=targets[0],
            min_speedup=targets[1],
            tracking_uri=mlflow_server.url,
        )
    assert registry.ALIAS_CHAMPION not in client.get_model_version(name, mv.version).aliases
    # A non-finite figure fails the gate, whatever the targets.
    reasons = registry.gate_reasons({"accuracy_kept": float("nan"), "speedup": float("inf")}, 0.0, 0.0)
    assert reasons and "not a finite number" in reasons[0]


# --------------------------------------------------------------------------- 7. YAML alias bomb


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
gkd: {lr: 0.001}
"""

_BOMB_PROBE = """
import json, resource, sys, time, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
tracemalloc.start()
t0 = time.perf_counter()
outcome = "accepted"
try:
    if sys.argv[1] == "config":
        from puzzle.config import load_config
        load_config(sys.argv[2], check_access=False)
    else:
        from pipelines.trigger.profiles import run_config
        run_config("bomb", "models:/m/1", profiles_dir=sys.argv[2])
except MemoryError:
    outcome = "MemoryError"
except Exception as exc:
    outcome = type(exc).__name__ + ": " + str(exc)[:300]
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mib": tracemalloc.get_traced_memory()[1] / 2**20,
                  "outcome": outcome}))
"""


@pytest.mark.parametrize("where", ["config", "profile"])
def test_a_yaml_alias_bomb_is_refused_fast_in_little_memory(tmp_path: Path, where: str) -> None:
    (tmp_path / "bomb.yaml").write_text(BILLION_LAUGHS)
    target = tmp_path / "bomb.yaml" if where == "config" else tmp_path
    # In a child process with a 3 GiB address-space cap and a timeout, so that a loader that
    # expands the bomb fails this test instead of the machine.
    try:
        run = subprocess.run(
            [sys.executable, "-c", _BOMB_PROBE, where, str(target)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loading the alias bomb ran for more than 60 s")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"alias bomb ({where}): {result}")
    assert "alias bomb" in result["outcome"] and "Error" in result["outcome"], result
    assert result["seconds"] < 2.0 and result["peak_mib"] < 32, result


def test_yaml_that_nests_too_deeply_is_refused_not_a_recursion_traceback(tmp_path: Path) -> None:
    from puzzle.config import ConfigError, load_config

    path = tmp_path / "deep.yaml"
    path.write_text("gkd: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid YAML.*nested"):
        load_config(str(path), check_access=False)


# --------------------------------------------------------------------------- 8. checkpoints without pickle


class _Planted:
    """What an attacker plants: unpickling it creates a file (it could run anything)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def bld_inputs(tiny_parent_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from dataclasses import replace

    from puzzle.config import DataConfig
    from puzzle.data import prepare
    from puzzle.library.variants import PAPER_LIBRARY, build_library
    from puzzle.parent import convert

    root = tmp_path_factory.mktemp("faults-bld")
    convert(str(tiny_parent_factory("llama", intermediate_size=192)), str(root / "parent"))
    prepare(
        str(root / "parent"),
        str(root / "tokens"),
        DataConfig(seq_len=32, splits={"calibration": 8, "bld": 40, "score": 8}),
    )
    build_library(
        str(root / "parent"),
        str(root / "tokens"),
        str(root / "lib"),
        replace(PAPER_LIBRARY, kv_heads=[1], ffn_fractions=[1.0, 0.5]),
    )
    return {name: str(root / name) for name in ("parent", "tokens", "lib")} | {"root": str(root)}


def test_a_planted_bld_checkpoint_is_refused_and_never_unpickled(bld_inputs: dict[str, str]) -> None:
    import torch

    from puzzle.config import BLDConfig
    from puzzle.library import bld
    from puzzle.modeling.checkpoints import CheckpointError

    out = Path(bld_inputs["root"]) / "trained-planted"
    marker = Path(bld_inputs["root"]) / "PWNED-bld"
    work = Path(f"{out}.partial") / ".work"
    work.mkdir(parents=True)
    torch.save(_Planted(marker), work / bld.CHECKPOINT)
    settings = BLDConfig(token_budget=4 * 8 * 32, batch_size=8, checkpoint_every=1)
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        bld.train(bld_inputs["lib"], bld_inputs["parent"], bld_inputs["tokens"], str(out), settings)
    assert not marker.exists(), "the checkpoint was unpickled"


def test_real_bld_checkpoints_load_without_pickle(bld_inputs: dict[str, str]) -> None:
    from puzzle.config import BLDConfig
    from puzzle.library import bld
    from puzzle.modeling.checkpoints import load_training_state

    out = Path(bld_inputs["root"]) / "trained-killed"
    settings = BLDConfig(token_budget=4 * 8 * 32, batch_size=8, checkpoint_every=1)

    def kill(step: int) -> None:
        if step == 1:
            raise KeyboardInterrupt  # after the checkpoint of step 2 of 4

    with pytest.raises(KeyboardInterrupt):
        bld.train(
            bld_inputs["lib"], bld_inputs["parent"], bld_inputs["tokens"], str(out), settings, on_step=kill
        )
    state = load_training_state(Path(f"{out}.partial") / ".work" / bld.CHECKPOINT)  # weights_only=True
    assert state["step"] == 2 and state["units"]
    resumed: list[int] = []
    manifest = bld.train(
        bld_inputs["lib"],
        bld_inputs["parent"],
        bld_inputs["tokens"],
        str(out),
        settings,
        on_step=resumed.append,
    )
    assert manifest.summary["resumed_from_step"] == 2 and resumed == [2, 3]


def test_sharded_gkd_checkpoints_load_without_running_pickled_code(tiny_parent: Path, tmp_path: Path) -> None:
    """GKD checkpoints are torch.distributed.checkpoint folders: their .metadata is a pickle and
    their non-tensor entries are torch.load(weights_only=False) in torch's own reader."""
    import pickle
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from puzzle.modeling.checkpoints import CheckpointError, load_model, load_sharded_state

    model = load_model(str(tiny_parent), dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model(torch.tensor([[3, 4, 5]])).logits.sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        ms, os_ = get_state_dict(model, optimizer)
        dcp.save({"model": ms, "optim": os_}, checkpoint_id=str(tmp_path / "step"))
        fresh = load_model(str(tiny_parent), dtype=torch.float32)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
        fms, fos = get_state_dict(fresh, fresh_opt)
        load_sharded_state({"model": fms, "optim": fos}, tmp_path / "step")
        set_state_dict(fresh, fresh_opt, model_state_dict=fms, optim_state_dict=fos)
    assert fresh_opt.param_groups[0]["lr"] == 3e-4
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    marker = tmp_path / "PWNED-gkd"
    (tmp_path / "step" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    with pytest.raises(CheckpointError, match="may not appear in a checkpoint"):
        load_sharded_state({"model": fms, "optim": fos}, tmp_path / "step")
    assert not marker.exists()


# --------------------------------------------------------------------------- 9. trigger server limits


@pytest.fixture
def bare_server(tmp_path: Path):
    """The trigger's HTTP server with a 2 s request deadline (no MLflow behind it)."""
    from pipelines.trigger.server import TriggerServer
    from pipelines.trigger.service import TriggerService
    from pipelines.trigger.settings import TriggerSettings
    from pipelines.trigger.store import TriggerStore

    settings = TriggerSettings(
        tracking_uri="http://127.0.0.1:9",
        secret=trig.SECRET,
        state_db=str(tmp_path / "s.sqlite"),
        reconcile_interval_s=0,
    )
    service = TriggerService(settings, trig.RecordingBackend(), TriggerStore(settings.state_db), None)
    server = TriggerServer(service, "127.0.0.1", 0, request_deadline_s=2.0).start()
    yield service, server
    server.stop()


def _health(port: int) -> float:
    import urllib.request

    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    return time.perf_counter() - t0


def test_slow_loris_connections_are_cut_at_the_request_deadline(bare_server) -> None:
    service, server = bare_server
    results: list[tuple[float, bytes]] = [None] * 20  # type: ignore[list-item]
    started = time.perf_counter()

    def drip(i: int) -> None:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.2)
        answer = b""
        while time.perf_counter() - started < 8:
            try:
                sock.sendall(b"X")  # one byte of a header, every 0.2 s
            except OSError:
                break
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
        results[i] = (time.perf_counter() - started, answer)
        sock.close()

    threads = [threading.Thread(target=drip, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    health = [_health(server.port) for _ in range(3)]  # served while 20 connections drip
    for t in threads:
        t.join(15)
    closed_after = max(r[0] for r in results)
    print(f"slow-loris: 20 connections closed after at most {closed_after:.2f} s; health checks {health}")
    assert closed_after < 4.0, "a dripping connection outlived the 2 s request deadline"
    assert max(health) < 1.0
    for _, answer in results:
        assert answer.startswith(b"HTTP/1.1 400") and b"deadline" in answer, answer[:200]


def test_idle_and_deeply_nested_requests_get_a_400_and_a_json_log_line(bare_server, capfd, caplog) -> None:
    caplog.set_level("INFO", logger="pipelines.trigger")
    service, server = bare_server
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    t0 = time.perf_counter()
    answer = idle.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and time.perf_counter() - t0 < 4, answer
    body = b"[" * 20000 + b"]" * 20000
    headers = trig.signed(body)
    status, payload = trig.post(server.port, body, headers)
    assert status == 400 and "nested too deeply" in payload["reason"], payload
    server.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    reasons = [r.reason for r in caplog.records if r.getMessage() == "delivery rejected"]  # type: ignore[attr-defined]
    assert any("deadline" in r for r in reasons) and any("nested" in r for r in reasons), reasons
    from pipelines.trigger.logs import JsonFormatter

    line = json.loads(
        JsonFormatter().format(next(r for r in caplog.records if r.getMessage() == "delivery rejected"))
    )
    assert line["status"] == 400


def test_the_listen_backlog_and_connection_cap(bare_server) -> None:
    _, server = bare_server
    assert server.httpd.request_queue_size >= 1024
    assert server.httpd.max_connections == 64


@pytest.mark.integration
def test_a_burst_of_200_deliveries_is_answered_without_resets_and_submits_once_per_version(
    mlflow_server, monkeypatch, tmp_path: Path, tiny_parent_factory
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient

    from pipelines.trigger import build_service
    from pipelines.trigger.server import TriggerServer
    from pipelines.trigger.settings import TriggerSettings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient(mlflow_server.url)
    name = f"burst-{uuid.uuid4().hex[:6]}"
    first = trig.register_parent(tiny_parent_factory("llama"), name)
    mv = client.get_model_version(name, first)
    versions = [first] + [
        client.create_model_version(name, source=mv.source, run_id=mv.run_id).version for _ in range(3)
    ]
    settings = TriggerSettings(
        tracking_uri=mlflow_server.url,
        secret=trig.SECRET,
        state_db=str(tmp_path / "state.sqlite"),
        reconcile_interval_s=0,
    )
    backend = trig.RecordingBackend()
    server = TriggerServer(build_service(settings, backend), "127.0.0.1", 0).start()
    bodies = [trig.tag_event(name, versions[i % 4], "puzzle.request", "default") for i in range(200)]
    barrier = threading.Barrier(50)

    def deliver(body: bytes) -> tuple[int, str]:
        try:
            barrier.wait(timeout=10)
        except threading.BrokenBarrierError:
            pass
        try:
            status, payload = trig.post(server.port, body, trig.signed(body))
            return status, payload.get("status", "")
        except OSError as exc:  # a reset or a refused connection
            return -1, repr(exc)

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=50) as pool:
            answers = list(pool.map(deliver, bodies))
        seconds = time.perf_counter() - t0
    finally:
        server.stop()
    failures = [a for a in answers if a[0] != 200]
    print(f"burst: 200 deliveries answered in {seconds:.1f} s; {len(failures)} not 200")
    assert failures == [], failures[:5]
    assert sorted(r.version for r in backend.requests) == sorted(versions)
    assert sum(a[1] == "submitted" for a in answers) == 4
    assert seconds < 60


# --------------------------------------------------------------------------- 10. smaller ones


def test_a_corrupted_output_is_not_up_to_date_and_the_errors_say_what_to_do(
    tiny_parent_factory, tmp_path: Path, capsys
) -> None:
    from puzzle.parent import convert

    parent = str(tiny_parent_factory("llama"))
    out = tmp_path / "parent"
    convert(parent, str(out))
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, text = _main(["convert", parent, "--out", str(out)], capsys)
    assert code == 2 and "checksum mismatch" in text and f"delete {out}" in text, text
    assert "skipping" not in text
    code, text = _main(["export", str(out), "--out", str(tmp_path / "export")], capsys)  # the next phase
    assert code == 2 and f"delete {out} and re-run" in text, text


def test_a_binary_config_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    code, text = _main(["run", "--config", str(path), "--check"], capsys)
    assert code == 2 and "not UTF-8 text" in text and "Traceback" not in text, text


@pytest.mark.parametrize("kind", ["random", "header-only"])
def test_a_64_byte_gguf_is_a_clear_error(tmp_path: Path, capsys, kind: str) -> None:
    import struct

    path = tmp_path / "model.gguf"
    if kind == "random":
        path.write_bytes(os.urandom(64))
    else:  # the GGUF magic and a header that promises metadata the file does not hold
        path.write_bytes(
            (b"GGUF" + struct.pack("<IQQ", 3, 1, 3) + struct.pack("<Q", 20) + b"general.arch").ljust(
                64, b"\0"
            )
        )
    code, text = _main(["convert", str(path), "--out", str(tmp_path / "parent")], capsys)
    assert code == 2 and "GGUF" in text and "Traceback" not in text, text
    assert not (tmp_path / "parent.partial").exists()


@pytest.mark.integration
def test_exported_is_logged_only_once_the_upload_succeeded(
    s3_server, s3_bucket: str, tiny_parent: Path, monkeypatch, caplog
) -> None:
    from puzzle.child.export import export
    from puzzle.config import ExportConfig

    caplog.set_level("INFO", logger="puzzle.child.export")

    def broken_upload(local: Any, uri: str) -> None:
        raise storage.StorageError(f"S3 refused {uri}")

    monkeypatch.setattr(storage, "upload_file", broken_upload)
    out = f"s3://{s3_bucket}/export"
    with pytest.raises(storage.StorageError):
        export(str(tiny_parent), out, ExportConfig())
    assert not [r for r in caplog.records if r.getMessage().startswith("exported")]
    monkeypatch.undo()
    export(str(tiny_parent), out, ExportConfig())
    assert [r for r in caplog.records if r.getMessage().startswith("exported")]


def test_no_partial_folder_is_left_after_an_input_error(tiny_parent_factory, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_parent_factory("llama"), broken)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    code, text = _main(["convert", str(broken), "--out", str(tmp_path / "parent")], capsys)
    assert code == 2 and "tokenizer" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tokenizer"]


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ("parent=./no/such/parent", "parent './no/such/parent' does not exist"),
        ("parent=/no/such/model.gguf", "does not exist"),
        ("gkd.token_budget=1.0e+30", "gkd.token_budget must be at most 1e+12 tokens"),
        ("bld.token_budget=1.0e+30", "bld.token_budget must be at most 1e+12 tokens"),
    ],
)
def test_check_refuses_a_missing_parent_and_absurd_budgets(
    tmp_path: Path, capsys, override: str, complaint: str
) -> None:
    code, text = _main(["run", "--check", "--set", f"output={tmp_path / 'runs'}", "--set", override], capsys)
    assert code == 2 and complaint in text, text


# --------------------------------------------------------------------------- 11. chart defaults


@pytest.fixture(scope="module")
def chart_default() -> list[dict[str, Any]]:
    import helm_python as helm

    with helm.Chart.load(ROOT / "charts" / "puzzle") as chart:
        rendered = chart.render({}, name="puzzle", namespace="ml-team", is_install=True)
    return [d for p, t in rendered.items() if p.endswith(".yaml") for d in yaml.safe_load_all(t) if d]


def _pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "Job")}


def test_chart_dns_egress_goes_only_to_the_cluster_dns(chart_default) -> None:
    policies = [d for d in chart_default if d["kind"] == "NetworkPolicy"]
    assert policies
    for policy in policies:
        for rule in policy["spec"]["egress"]:
            assert rule.get("to"), f"{policy['metadata']['name']}: an egress rule to any address: {rule}"
            if any(p["port"] == 53 for p in rule["ports"]):
                assert rule["to"] == [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }
                ]


def test_chart_setup_job_is_under_a_network_policy(chart_default) -> None:
    labels = _pods(chart_default)["Job"]["metadata"]["labels"]
    covering = [
        d
        for d in chart_default
        if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(covering) == 1
    policy = covering[0]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["ingress"] == []


def test_chart_setup_containers_mount_only_the_secrets_they_use(chart_default) -> None:
    job = _pods(chart_default)["Job"]["spec"]
    steps = {c["name"]: c for c in job.get("initContainers", []) + job["containers"]}
    for name, c in steps.items():
        mounts = {m["name"] for m in c["volumeMounts"]}
        env = {e["name"] for e in c["env"]}
        assert ("webhook-secret" in mounts) == (name == "register-webhook"), name
        assert ("kfp-token" in mounts) == (name != "register-webhook"), name
        assert ("KF_PIPELINES_SA_TOKEN_PATH" in env) == (name != "register-webhook"), name
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & env, name


def test_chart_images_are_pinned_and_by_digest_when_one_is_recorded(chart_default) -> None:
    import helm_python as helm

    images = yaml.safe_load((ROOT / "components" / "images.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts" / "puzzle" / "values.yaml").read_text())
    cpu = images["images"]["cpu"]
    assert values["image"]["digest"] == cpu.get("digest", ""), "charts/puzzle/values.yaml image.digest"
    expected = f"{images['registry']}/{cpu['name']}:{images['version']}"
    if cpu.get("digest"):
        expected += f"@{cpu['digest']}"
    for pod in _pods(chart_default).values():
        spec = pod["spec"]
        assert {c["image"] for c in spec.get("initContainers", []) + spec["containers"]} == {expected}
    with helm.Chart.load(ROOT / "charts" / "puzzle") as chart:
        with pytest.raises(helm.HelmValuesError, match="/image/tag"):
            chart.render({"image": {"tag": "latest"}}, name="puzzle", namespace="ml-team")
        pinned = chart.render(
            {"image": {"digest": "sha256:" + "cd" * 32}}, name="puzzle", namespace="ml-team"
        )
    assert f"{expected.split('@')[0]}@sha256:{'cd' * 32}" in pinned["puzzle/templates/deployment.yaml"]


def test_chart_keeps_the_trigger_state_across_restarts_by_default(chart_default) -> None:
    claims = [d for d in chart_default if d["kind"] == "PersistentVolumeClaim"]
    state = next(v for v in _pods(chart_default)["Deployment"]["spec"]["volumes"] if v["name"] == "state")
    assert claims and state["persistentVolumeClaim"]["claimName"] == claims[0]["metadata"]["name"]


def test_the_webhook_end_to_end_test_waits_for_mlflows_webhook_cache() -> None:
    """Item 12: the e2e test makes its request only after MLflow delivered a warm-up event."""
    source = (ROOT / "tests" / "test_trigger.py").read_text()
    e2e = source.split(
        "def test_tagging_a_parent_version_in_mlflow_runs_puzzle_once_and_registers_the_child"
    )[1]
    warm_up, request = e2e.index("wait_for(warmed_up"), e2e.index('"puzzle.request", "tiny"')
    assert warm_up < request
