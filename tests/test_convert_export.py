"""Parents of every supported family convert and export with identical logits and generations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fresh_process import run_in_fresh_process, run_many_in_fresh_process

from puzzle.child.export import export
from puzzle.config import ExportConfig
from puzzle.io import artifacts
from puzzle.parent import ParentError, convert

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def parent_logits_and_generation(parent_dir: Path, ids: torch.Tensor, new_tokens: int = 20):
    from transformers import AutoModelForCausalLM

    parent = AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = parent(ids).logits
        gen = parent.generate(ids[:1], max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return logits, gen


@pytest.fixture(scope="module")
def exported_families(tiny_parent_factory, tmp_path_factory):
    """Every family (plus Llama-3 RoPE scaling) converted, exported and run in ONE fresh process."""
    root = tmp_path_factory.mktemp("families")
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cases = {
        "llama": tiny_parent_factory("llama"),
        "mistral": tiny_parent_factory("mistral", sliding_window=4),
        "qwen2": tiny_parent_factory("qwen2"),
        "qwen3": tiny_parent_factory("qwen3"),
        "llama3-rope": tiny_parent_factory("llama", seed=5, rope_parameters=llama3_rope),
    }
    jobs, expected, manifests = [], {}, {}
    for name, parent_dir in cases.items():
        manifests[name] = convert(str(parent_dir), str(root / name / "child"))
        export(str(root / name / "child"), str(root / name / "export"), ExportConfig())
        length = 100 if name == "llama3-rope" else 13  # past original_max_position_embeddings
        ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(1))
        expected[name] = parent_logits_and_generation(parent_dir, ids)
        jobs.append({"checkpoint": root / name / "export", "ids": ids.tolist(), "new_tokens": 20})
    results = run_many_in_fresh_process(jobs, root)
    return {
        name: {
            "expected": expected[name],
            "result": result,
            "export": root / name / "export",
            "manifest": manifests[name],
        }
        for name, result in zip(cases, results)
    }


@pytest.mark.parametrize("family", [*FAMILIES, "llama3-rope"])
def test_family_converts_exports_and_reloads_in_fresh_process_identically(family, exported_families):
    case = exported_families[family]
    (expected, expected_gen), result = case["expected"], case["result"]
    assert result["class"] == "DeciLMForCausalLM" and "puzzle" not in result["module"]
    assert (result["logits"] - expected).abs().max().item() <= 1e-4
    assert torch.equal(result["generated"], expected_gen)
    assert case["manifest"].summary["parent_logits_max_abs_diff"] <= 1e-4
    config = json.loads((case["export"] / "config.json").read_text())
    assert config["qkv_bias"] is (family == "qwen2")
    assert config["qk_norm"] is (family == "qwen3")
    if family == "mistral":
        assert config["sliding_window"] == 4
    if family == "llama3-rope":
        assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 500000.0


@pytest.mark.integration
def test_real_smollm2_converts_exports_and_says_berlin(smollm2_parent, tmp_path):
    """Parent == child is checked at conversion (manifest); child == export in a fresh process."""
    from transformers import AutoTokenizer

    from puzzle.modeling.checkpoints import load_model

    manifest = artifacts.read_manifest(str(smollm2_parent))
    assert manifest.summary["parent_logits_max_abs_diff"] <= 1e-4
    out = tmp_path / "export"
    export(str(smollm2_parent), str(out), ExportConfig())
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ids = tokenizer("The capital of Germany is", return_tensors="pt").input_ids
    child = load_model(str(smollm2_parent), dtype=torch.float32)  # stored in float16 (a GGUF parent)
    with torch.no_grad():
        expected = child(ids).logits
        expected_gen = child.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    result = run_in_fresh_process(out, ids.tolist(), tmp_path)
    assert (result["logits"] - expected).abs().max().item() <= 1e-4
    assert torch.equal(result["generated"], expected_gen)
    completion = tokenizer.decode(result["generated"][0, ids.shape[1] :])
    assert completion.startswith(" Berlin"), completion


def test_converting_again_with_same_inputs_is_skipped(tiny_parent_factory, tmp_path):
    parent_dir = tiny_parent_factory("llama")
    first = convert(str(parent_dir), str(tmp_path / "child"))
    mtime = (tmp_path / "child" / "model.safetensors").stat().st_mtime_ns
    second = convert(str(parent_dir), str(tmp_path / "child"))
    assert second.created_at == first.created_at
    assert (tmp_path / "child" / "model.safetensors").stat().st_mtime_ns == mtime


# --- S3 -----------------------------------------------------------------------------------


def upload_dir(client, bucket: str, prefix: str, local: Path) -> None:
    for path in local.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local)}")


@pytest.mark.integration
def test_round_trip_through_real_s3(s3_server, s3_bucket, tiny_parent_factory, tmp_path):
    client = s3_server.client()
    parent_dir = tiny_parent_factory("qwen2")
    upload_dir(client, s3_bucket, "parents/qwen2", parent_dir)
    child_uri = f"s3://{s3_bucket}/runs/child"
    export_uri = f"s3://{s3_bucket}/serving/qwen2-child"
    convert(f"s3://{s3_bucket}/parents/qwen2", child_uri)
    export(child_uri, export_uri, ExportConfig())
    keys = {
        o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="serving/qwen2-child/")["Contents"]
    }
    assert {
        "serving/qwen2-child/config.json",
        "serving/qwen2-child/manifest.json",
        "serving/qwen2-child/modeling_decilm.py",
    } <= keys
    local = tmp_path / "download"
    for key in keys:
        target = local / key.removeprefix("serving/qwen2-child/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(s3_bucket, key, str(target))
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    expected, expected_gen = parent_logits_and_generation(parent_dir, ids)
    result = run_in_fresh_process(local, ids.tolist(), tmp_path)
    assert (result["logits"] - expected).abs().max().item() <= 1e-4
    assert torch.equal(result["generated"], expected_gen)


@pytest.mark.integration
def test_corrupted_s3_object_is_detected_by_checksum(s3_server, s3_bucket, tiny_parent_factory, tmp_path):
    child_uri = f"s3://{s3_bucket}/child"
    convert(str(tiny_parent_factory("llama")), child_uri)
    client = s3_server.client()
    body = bytearray(client.get_object(Bucket=s3_bucket, Key="child/model.safetensors")["Body"].read())
    body[-10] ^= 0xFF  # same size, one byte flipped
    client.put_object(Bucket=s3_bucket, Key="child/model.safetensors", Body=bytes(body))
    with pytest.raises(artifacts.ArtifactError, match="checksum mismatch for model.safetensors"):
        export(child_uri, str(tmp_path / "export"), ExportConfig())


@pytest.mark.integration
def test_wrong_s3_credentials_name_endpoint_and_bucket(
    s3_server, s3_bucket, tiny_parent_factory, monkeypatch
):
    from puzzle.io import storage

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage._client_for.cache_clear()
    try:
        with pytest.raises(storage.StorageError) as info:
            convert(str(tiny_parent_factory("llama")), f"s3://{s3_bucket}/child")
    finally:
        monkeypatch.undo()
        storage._client_for.cache_clear()
    message = str(info.value)
    assert s3_server.endpoint in message and s3_bucket in message and "credentials" in message


# --- bad input ----------------------------------------------------------------------------


def test_unknown_architecture_lists_supported_families(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(
        ParentError, match=r"unsupported parent architecture 'gpt2'.*llama, mistral, qwen2, qwen3"
    ):
        convert(str(tmp_path / "gpt2"), str(tmp_path / "child"))
    assert not (tmp_path / "child").exists()


def test_missing_tokenizer_is_a_clear_error(tiny_parent_factory, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(tiny_parent_factory("llama"), parent)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (parent / name).unlink(missing_ok=True)
    with pytest.raises(ParentError, match="no usable tokenizer"):
        convert(str(parent), str(tmp_path / "child"))


def test_truncated_safetensors_is_a_clear_error(tiny_parent_factory, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(tiny_parent_factory("llama"), parent)
    weights = parent / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ParentError, match="cannot load the parent's weights"):
        convert(str(parent), str(tmp_path / "child"))


def test_truncated_child_artifact_is_detected(tiny_parent, tmp_path):
    child = tmp_path / "child"
    shutil.copytree(tiny_parent, child)
    weights = child / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(artifacts.ArtifactError, match="truncated or corrupt"):
        export(str(child), str(tmp_path / "export"), ExportConfig())


def test_not_a_parent_path_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParentError, match="no config.json"):
        convert(str(tmp_path / "empty"), str(tmp_path / "child"))


def test_cli_prints_one_line_errors(tmp_path, capsys):
    from puzzle.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), "--out", str(tmp_path / "child")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("puzzle: error:") and "Traceback" not in err


def test_unreachable_hub_id_says_how_to_load_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ParentError, match="cannot fetch 'meta-llama/Llama-3.2-1B' from the Hugging Face hub"):
        convert("meta-llama/Llama-3.2-1B", str(tmp_path / "child"))
