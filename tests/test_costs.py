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
    with pytest.MonkeyPatch.context() as mp:
        # Fewer copies and repeats than on a real parent (tiny layers, and the tests' time).
        mp.setattr(TorchBackend, "CPU_MAX_STACK", 16)
        mp.setattr(TorchBackend, "CPU_MIN_REPEATS", 3)
        mp.setattr(TorchBackend, "PRECISION_BUDGET_S", 2.0)
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
            if name.endswith("_noop"):
                assert "spread" not in e
                continue
            # Every measured entry is positive (never clipped) and records how its repeats spread.
            assert e["prefill_ms"] > 0 and e["decode_ms"] > 0 and e["repeats"] >= 3
            for key in ("prefill_ms", "decode_ms", "runtime_ms"):
                s = e["spread"][key]
                assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"] and s["n"] == e["repeats"]
    assert table.subblock("attn_noop", 2)["runtime_ms"] == 0 and not data["subblocks"]["ffn_noop"]["measured"]
    # Tiny layers: as many copies as allowed (here 16), far below 4x the CPU's last-level cache.
    assert data["subblocks"]["ffn_256"]["measured"] and data["subblocks"]["ffn_256"]["stack_layers"] == 16
    assert data["measurement"]["repeats_per_round"] == 3 and data["measurement"]["cpu_seconds"] > 0
    assert table.fixed(1)["prefill_ms"] > 0
    # The CSV holds one row per (sub-block, batch size), the same figures as the JSON.
    lines = (Path(tiny["costs"]) / "costs.csv").read_text().splitlines()
    assert lines[0].startswith("subblock,kind,batch_size") and len(lines) == 1 + 9 * 2 == 1 + len(
        data["rows"]
    )
    assert lines[0].endswith(",runtime_ms_q1,runtime_ms_q3,repeats")


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


def test_smollm2_shapes_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2-135M's real shapes and default search space, random weights (timings faked: the tiny
    library's table above is timed for real)."""
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
    backend = fake_backend(monkeypatch, [(1.2, 0.12)], repeats=1, stack_layers=1)
    data = build_table(config, names, workload, backend)
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
        all(table.subblock(n, 1)["decode_ms"] > 0 for n in names if not n.endswith("_noop"))
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


class FakeProbe:
    """Stands for a model ready to time: each repeat returns the next (prefill s, decode s) of a script."""

    def __init__(self, script: list[tuple[float, float]]) -> None:
        self.script = script
        self.calls = 0

    def once(self) -> tuple[float, float]:
        self.calls += 1
        return self.script[min(self.calls, len(self.script)) - 1]


def fake_backend(
    monkeypatch: pytest.MonkeyPatch, stacked: list[tuple[float, float]], **kw: object
) -> TorchBackend:
    """A CPU backend whose model without layers always takes 1 s + 0.1 s a step, and whose stack of
    ``stack_layers`` copies follows ``stacked`` (one entry per repeat)."""
    backend = TorchBackend(device="cpu", **kw)  # type: ignore[arg-type]
    base, stack = FakeProbe([(1.0, 0.1)]), FakeProbe(stacked)
    monkeypatch.setattr(backend, "_probe", lambda weights, batch, workload: stack if weights.layers else base)
    return backend


def small_config():
    """A small parent shape: the fake timings below need real (cheap) weights to stack."""
    from transformers import LlamaConfig

    from puzzle.parent import decilm_config

    return decilm_config(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def test_stack_enough_copies_to_leave_the_cpu_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(costs, "last_level_cache_bytes", lambda: 32 * 2**20)
    backend = TorchBackend(device="cpu")
    # SmolLM2's sub-blocks in float32: 4 x 32 MiB of weights, within 8..64 copies.
    assert [backend.stack_layers(b) for b in (3_541_248, 10_619_136, 5_310_720, 10**9, 1000)] == [
        38,
        13,
        26,
        8,
        64,
    ]
    assert TorchBackend(device="cpu", stack_layers=3).stack_layers(1000) == 3
    assert backend.timed_repeats == 5 and TorchBackend(device="cpu", repeats=7).timed_repeats == 7


def test_a_negative_estimate_is_measured_again_not_clipped(monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_config()
    workload = CostsConfig(batch_sizes=[1], prompt_len=8, gen_len=4)
    # First round of 3 repeats: the stack of 2 copies looks faster than no layers at all (noise); the
    # two further rounds time it 0.2 s (prefill) and 0.02 s (a step) slower: 0.1 s and 0.01 s a copy.
    noisy = [(0.9, 0.09)] * 3 + [(1.2, 0.12)] * 6
    backend = fake_backend(
        monkeypatch, noisy, repeats=3, min_repeats=1, stack_layers=2, remeasure_rounds=2, precision=0.05
    )
    row = backend.measure_subblock(config, "ffn_256", workload)[1]
    assert row["rounds"] == 3 and row["repeats"] == 9 and row["stack_layers"] == 2 and row["precise"]
    assert row["prefill_ms"] == pytest.approx(100.0) and row["decode_ms"] == pytest.approx(10.0)
    # The negative repeats are not dropped, they are in the recorded spread.
    assert row["spread"]["prefill_ms"]["min"] == pytest.approx(-50.0)
    assert row["spread"]["runtime_ms"]["median"] == pytest.approx(130.0)

    # Enough positive repeats in the first round: no second round.
    backend = fake_backend(monkeypatch, [(1.2, 0.12)], repeats=3, min_repeats=1, stack_layers=2)
    assert backend.measure_subblock(config, "ffn_256", workload)[1]["rounds"] == 1

    # Still positive but spread wide after every round: kept, with its spread, flagged imprecise.
    wide = [(1.05, 0.11), (1.6, 0.2), (1.1, 0.101)] * 3
    backend = fake_backend(monkeypatch, wide, repeats=3, min_repeats=1, stack_layers=2, remeasure_rounds=2)
    row = backend.measure_subblock(config, "ffn_256", workload)[1]
    assert row["rounds"] == 3 and row["repeats"] == 9 and not row["precise"] and row["prefill_ms"] > 0
    assert row["spread"]["runtime_ms"]["q3"] > row["spread"]["runtime_ms"]["q1"]

    # Out of time: the imprecise estimate is kept after one round; a negative one is still measured again.
    backend = fake_backend(monkeypatch, wide, repeats=3, min_repeats=1, stack_layers=2, precision_budget_s=0)
    assert backend.measure_subblock(config, "ffn_256", workload)[1]["rounds"] == 1
    backend = fake_backend(
        monkeypatch, noisy, repeats=3, min_repeats=1, stack_layers=2, precision=0.05, precision_budget_s=0
    )
    assert backend.measure_subblock(config, "ffn_256", workload)[1]["rounds"] == 2


def test_an_estimate_negative_after_every_round_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_config()
    workload = CostsConfig(batch_sizes=[1], prompt_len=8, gen_len=4)
    backend = fake_backend(
        monkeypatch, [(0.95, 0.11)], repeats=2, min_repeats=1, stack_layers=4, remeasure_rounds=1
    )
    with pytest.raises(
        CostsError,
        match=r"ffn_256 at batch 1: its prefill time is -12.5 ms per copy .* over 4 repeats in 2 rounds\): "
        r"4 stacked copies were not measurably slower.*raise costs.repeats \(now 2\) or costs.stack_layers "
        r"\(now 4\)",
    ):
        backend.measure_subblock(config, "ffn_256", workload)


def test_spread_is_recorded_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    config = small_config()
    workload = CostsConfig(batch_sizes=[1], prompt_len=8, gen_len=4)
    backend = fake_backend(monkeypatch, [(1.2, 0.12), (1.3, 0.13), (1.25, 0.125)], repeats=3, stack_layers=2)
    data = build_table(config, ["ffn_256", "attn_noop"], workload, backend)
    per = data["subblocks"]["ffn_256"]["batches"]["1"]
    assert per["prefill_ms"] == pytest.approx(125.0) and per["repeats"] == 5 and per["rounds"] == 1
    assert per["spread"]["prefill_ms"]["min"] == pytest.approx(100.0)
    assert per["spread"]["prefill_ms"]["max"] == pytest.approx(150.0)
    fixed = data["subblocks"][costs.FIXED]["batches"]["1"]
    assert fixed["prefill_ms"] == pytest.approx(1000.0) and fixed["spread"]["decode_ms"]["se"] == 0
    row = next(r for r in data["rows"] if r["subblock"] == "ffn_256")
    assert row["runtime_ms_q1"] <= per["runtime_ms"] <= row["runtime_ms_q3"] and row["repeats"] == 5
    assert data["measurement"]["imprecise"] == [] and "load_average" in data["measurement"]
    # CostTable reads the new fields and sums blocks as before.
    table = costs.CostTable(data, "fake")
    assert table.block("attn_noop+ffn_256", 1)["runtime_ms"] == pytest.approx(per["runtime_ms"])
    assert costs.spread([3.0, 1.0, 2.0]) == {
        "min": 1.0,
        "q1": 1.5,
        "median": 2.0,
        "q3": 2.5,
        "max": 3.0,
        "n": 3,
        "se": pytest.approx(1.2533 * 1.4826 / 3**0.5),
    }
