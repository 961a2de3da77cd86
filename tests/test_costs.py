"""Cost tables: measured on this machine, with its hardware identity; mixing hardware is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from puzzle.cli import main
from puzzle.config import ConfigError, CostsConfig, DataConfig
from puzzle.library.variants import PAPER_LIBRARY, build_library, plan_layers
from puzzle.modeling import DeciLMForCausalLM, engine
from puzzle.modeling.checkpoints import count_parameters
from puzzle.search import costs
from puzzle.search.costs import (
    CostsError,
    TorchBackend,
    build_table,
    calibrate,
    check_same_hardware,
    load_costs,
)

WORKLOAD = {"batch_sizes": [1, 2], "prompt_len": 8, "gen_len": 4}
MEASURE = CostsConfig(repeats=1, **WORKLOAD)


@pytest.fixture(scope="module")
def tiny(tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny parent's library (1 and 2 KV heads, FFN 256 and 128, linear, no-op) and its cost table."""
    from puzzle.data import prepare

    root = tmp_path_factory.mktemp("costs-tiny")
    prepare(str(tiny_parent), str(root / "tokens"), DataConfig(seq_len=16, splits={"calibration": 4}))
    build_library(
        str(tiny_parent),
        str(root / "tokens"),
        str(root / "lib"),
        dataclasses.replace(PAPER_LIBRARY, ffn_fractions=[1.0, 0.5], ffn_multiple=64),
    )
    costs.measure(str(root / "lib"), str(tiny_parent), str(root / "costs"), MEASURE, device="cpu")
    return {
        "child": str(tiny_parent),
        "lib": str(root / "lib"),
        "costs": str(root / "costs"),
        "root": str(root),
    }


def smollm2_config():
    """SmolLM2-135M's real shapes (random weights are enough to time them)."""
    from transformers import LlamaConfig

    from puzzle.parent import decilm_config

    return decilm_config(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
        )
    )


def test_table_of_the_tiny_library(tiny: dict[str, str]) -> None:
    table = load_costs(tiny["costs"])
    data = json.loads((Path(tiny["costs"]) / "costs.json").read_text())
    assert table.names == [
        "attn_kv2",
        "attn_kv1",
        "attn_linear",
        "attn_noop",
        "ffn_256",
        "ffn_128",
        "ffn_linear",
        "ffn_noop",
    ]
    assert table.parent_blocks == ["attn_kv2+ffn_256"] * 3 and data["parent"] == {
        "block": "attn_kv2+ffn_256",
        "num_layers": 3,
    }
    assert table.batch_sizes == [1, 2] and table.workload["prompt_len"] == 8 and table.gen_len == 4
    # Hardware identity of this machine.
    hw = table.hardware
    assert (
        hw["device_type"] == "cpu"
        and hw["device_name"] == engine.cpu_name()
        and hw["torch"] == torch.__version__
    )
    assert hw["dtype"] == "float32" and hw["backend"] == "torch" and hw["host"]
    for name in [costs.FIXED, *table.names]:
        for b in (1, 2):
            e = table.subblock(name, b)
            assert e["prefill_ms"] >= 0 and e["decode_ms"] >= 0
            assert e["runtime_ms"] == pytest.approx(e["prefill_ms"] + 3 * e["decode_ms"])
    assert table.subblock("attn_noop", 2)["runtime_ms"] == 0 and not data["subblocks"]["ffn_noop"]["measured"]
    assert data["subblocks"]["ffn_256"]["measured"] and data["subblocks"]["ffn_256"]["stack_layers"] == 2
    assert table.fixed(1)["prefill_ms"] > 0
    # The CSV holds one row per (sub-block, batch size), the same figures as the JSON.
    lines = (Path(tiny["costs"]) / "costs.csv").read_text().splitlines()
    assert lines[0].startswith("subblock,kind,batch_size") and len(lines) == 1 + 9 * 2 == 1 + len(
        data["rows"]
    )


def test_params_memory_and_block_sums(tiny: dict[str, str]) -> None:
    table = load_costs(tiny["costs"])
    parent = DeciLMForCausalLM(table.config())
    # Parameters: the fixed part plus every layer's sub-blocks is the whole parent.
    assert table.totals(table.parent_blocks, 1)["params"] == count_parameters(parent)
    # attn_kv2: hidden 64, 4 heads of 16: norm + q + k + v + o; KV: 2 heads x 16 x (K, V) x 4 bytes per token.
    kv2 = table.subblock("attn_kv2", 2)
    assert (
        kv2["params"] == 64 + 64 * 64 + 2 * 64 * 32 + 64 * 64 and kv2["kv_bytes_per_token"] == 2 * 16 * 2 * 4
    )
    assert kv2["memory_bytes"] == kv2["params"] * 4 + 2 * (8 + 4) * kv2["kv_bytes_per_token"]
    assert table.subblock("ffn_128", 1)["memory_bytes"] == (64 + 3 * 64 * 128) * 4  # no KV cache
    block = table.block("attn_kv1+ffn_linear", 2)
    a, f = table.subblock("attn_kv1", 2), table.subblock("ffn_linear", 2)
    for key in ("runtime_ms", "prefill_ms", "decode_ms", "params", "memory_mib"):
        assert block[key] == pytest.approx(a[key] + f[key])
    parent_ms = table.parent_runtime_ms(2)
    assert parent_ms == pytest.approx(
        table.fixed(2)["runtime_ms"] + 3 * table.block("attn_kv2+ffn_256", 2)["runtime_ms"]
    )
    assert table.throughput(table.parent_blocks, 2) == pytest.approx(2 * 4 / (parent_ms / 1e3))
    with pytest.raises(CostsError, match="not measured at batch size 64"):
        table.block("attn_kv1+ffn_linear", 64)
    with pytest.raises(CostsError, match="no sub-block 'ffn_999'"):
        table.subblock("ffn_999", 1)


def test_a_table_from_other_hardware_is_refused(tiny: dict[str, str], tmp_path: Path) -> None:
    table = load_costs(tiny["costs"])
    data = json.loads((Path(tiny["costs"]) / "costs.json").read_text())
    data["hardware"].update(device_type="cuda", device_name="NVIDIA H100 80GB HBM3", driver="580.159.04")
    other_file = tmp_path / "h100.json"
    other_file.write_text(json.dumps(data))
    other = load_costs(str(other_file))
    check_same_hardware(table, load_costs(tiny["costs"]))  # same machine: fine
    with pytest.raises(
        CostsError, match=r"measured on '.+' and .*h100.json on 'NVIDIA H100 80GB HBM3'.*device_name"
    ):
        check_same_hardware(table, other)
    # A different dtype alone is other hardware too.
    data["hardware"] = dict(table.hardware, dtype="bfloat16")
    other_file.write_text(json.dumps(data))
    with pytest.raises(CostsError, match="dtype 'float32' vs 'bfloat16'"):
        check_same_hardware(table, load_costs(str(other_file)))
    # Calibrating (measuring here) against the H100's table is refused before anything is measured.
    with pytest.raises(CostsError, match="refusing to mix a cost table and a measurement"):
        calibrate(other, 1, device="cpu")


def test_resume_and_clear_errors_before_measuring(tiny: dict[str, str], tmp_path: Path) -> None:
    before = json.loads((Path(tiny["costs"]) / "manifest.json").read_text())["created_at"]
    costs.measure(tiny["lib"], tiny["child"], tiny["costs"], MEASURE, device="cpu")
    assert json.loads((Path(tiny["costs"]) / "manifest.json").read_text())["created_at"] == before  # skipped
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=r"costs.batch_sizes\[0\] must be > 0, got 0"):
        costs.measure(
            tiny["lib"],
            tiny["child"],
            str(out),
            CostsConfig(batch_sizes=[0], prompt_len=8, gen_len=4),
            device="cpu",
        )
    with pytest.raises(CostsError, match="does not match the parent"):  # a library of another parent
        costs.library_subblocks(tiny["lib"], smollm2_config())
    assert not out.exists()


def test_calibration_realizes_children_and_compares(tiny: dict[str, str]) -> None:
    table = load_costs(tiny["costs"])
    children = [["attn_kv1+ffn_128", "attn_noop+ffn_linear", "attn_linear+ffn_noop"]]
    report = calibrate(table, children, batch_sizes=[2], device="cpu")
    row = report["children"][0]["batches"]["2"]
    assert report["children"][0]["blocks"] == children[0] and report["summary"]["children"] == 1
    assert row["predicted_throughput"] == pytest.approx(table.throughput(children[0], 2))
    assert row["measured_throughput"] > 0 and row["error_pct"] == pytest.approx(
        100 * (row["predicted_throughput"] / row["measured_throughput"] - 1)
    )
    assert len(costs.random_children(table, 3, seed=1)) == 3
    with pytest.raises(CostsError, match="has 2 blocks but the table's parent has 3 layers"):
        calibrate(table, [["attn_kv1+ffn_128"] * 2], device="cpu")


def test_smollm2_shapes_table() -> None:
    """SmolLM2-135M's real shapes and default search space, random weights, on this CPU."""
    config = smollm2_config()
    names = list(
        dict.fromkeys(n for layer in plan_layers(config, PAPER_LIBRARY, None).values() for n in layer)
    )
    assert names == [
        "attn_kv3",
        "attn_kv1",
        "attn_linear",
        "attn_noop",
        "ffn_1536",
        "ffn_1280",
        "ffn_768",
        "ffn_512",
        "ffn_256",
        "ffn_linear",
        "ffn_noop",
    ]
    workload = CostsConfig(batch_sizes=[1, 2], prompt_len=8, gen_len=2)
    data = build_table(config, names, workload, TorchBackend(device="cpu", repeats=1, stack_layers=1))
    table = costs.CostTable(data, "smollm2")
    assert table.parent_blocks == ["attn_kv3+ffn_1536"] * 30
    with torch.device("meta"):
        parent = DeciLMForCausalLM(config)
    assert table.totals(table.parent_blocks, 1)["params"] == count_parameters(parent) == 134_515_008
    # KV cache of the parent per sequence: 30 layers x 3 heads x 64 x (K, V) x 4 bytes x 10 tokens.
    kv = (
        table.totals(table.parent_blocks, 2)["memory_bytes"]
        - table.totals(table.parent_blocks, 1)["memory_bytes"]
    )
    assert kv == 30 * 3 * 64 * 2 * 4 * 10
    assert table.fixed(1)["params"] == 49152 * 576 + 576  # tied embeddings counted once
    assert (
        all(table.subblock(n, 1)["decode_ms"] >= 0 for n in names)
        and table.throughput(table.parent_blocks, 2) > 0
    )


def test_cli_costs_with_calibration(tiny: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "costs",
            tiny["lib"],
            tiny["child"],
            "--out",
            tiny["costs"],
            "--set",
            "costs.batch_sizes=[1, 2]",
            "--set",
            "costs.prompt_len=8",
            "--set",
            "costs.gen_len=4",
            "--set",
            "costs.repeats=1",
            "--device",
            "cpu",
            "--calibrate",
            "1",
            "--calibration-out",
            str(Path(tiny["root"]) / "calibration.json"),
        ]
    )
    out = capsys.readouterr().out
    assert (
        rc == 0
        and f"costs: costs written to {tiny['costs']}" in out
        and "attn_kv1" in out
        and "calibration: mean |error|" in out
    )
    report = json.loads((Path(tiny["root"]) / "calibration.json").read_text())
    assert len(report["children"]) == 1 and set(report["children"][0]["batches"]) == {"1", "2"}
    # A batch size that is not an integer is refused before anything is measured.
    rc = main(
        ["costs", tiny["lib"], tiny["child"], "--out", tiny["costs"], "--set", "costs.batch_sizes=[1, x]"]
    )
    assert rc == 2 and "costs.batch_sizes[1] must be an integer, got 'x'" in capsys.readouterr().err
