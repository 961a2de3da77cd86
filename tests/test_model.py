"""The heterogeneous child model: every variant, KV cache, save/export/reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fresh_process import run_in_fresh_process
from safetensors import safe_open

from puzzle.child.export import export
from puzzle.config import ExportConfig
from puzzle.io import artifacts
from puzzle.modeling import AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig
from puzzle.modeling.block_config import engine_ffn_width
from puzzle.modeling.checkpoints import save_model

MIXED = [
    BlockConfig(attention=AttentionConfig(num_kv_heads=4), ffn=FFNConfig(intermediate_size=512)),  # parent
    BlockConfig(
        attention=AttentionConfig(num_kv_heads=1), ffn=FFNConfig(intermediate_size=256)
    ),  # fewer KV, narrow
    BlockConfig(attention=AttentionConfig(linear=True), ffn=FFNConfig(linear=True)),
    BlockConfig(attention=AttentionConfig(no_op=True), ffn=FFNConfig(intermediate_size=512)),
    BlockConfig(attention=AttentionConfig(num_kv_heads=2), ffn=FFNConfig(no_op=True)),
]


def mixed_config(**kw) -> DeciLMConfig:
    return DeciLMConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=len(MIXED),
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        block_configs=MIXED,
        bos_token_id=1,
        eos_token_id=2,
        **kw,
    )


def random_model(config: DeciLMConfig, seed: int = 0) -> DeciLMForCausalLM:
    torch.manual_seed(seed)
    model = DeciLMForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def mixed_child(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DeciLMForCausalLM]:
    from conftest import save_tiny_tokenizer

    model = random_model(mixed_config())
    out = tmp_path_factory.mktemp("mixed") / "child"

    def body(staging: Path, _inputs: dict) -> dict:
        save_model(model, None, staging, {"reference": "random", "family": "llama"})
        save_tiny_tokenizer(staging, 256)
        return {}

    artifacts.run_phase("child", str(out), {}, {"test": "mixed"}, body)
    return out, model


@pytest.fixture(scope="module")
def mixed_export(mixed_child, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mixed child exported once, in small shards so that sharding is exercised."""
    out = tmp_path_factory.mktemp("mixed-export") / "export"
    export(str(mixed_child[0]), str(out), ExportConfig(max_shard_size="200KB"))
    return out


def test_no_op_sub_blocks_have_no_parameters_and_pass_hidden_states_through() -> None:
    model = random_model(mixed_config())
    noop_attn = model.model.layers[3]
    assert not hasattr(noop_attn, "input_layernorm") and noop_attn.self_attn is None
    noop_ffn = model.model.layers[4]
    assert noop_ffn.mlp is None and not hasattr(noop_ffn, "post_attention_layernorm")
    both_noop = DeciLMForCausalLM(
        DeciLMConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            block_configs=[BlockConfig(attention=AttentionConfig(no_op=True), ffn=FFNConfig(no_op=True))],
        )
    )
    layer = both_noop.model.layers[0]
    assert sum(p.numel() for p in layer.parameters()) == 0
    x = torch.randn(2, 5, 16)
    assert torch.equal(layer(x), x)


def test_each_layer_has_the_shapes_its_block_config_says() -> None:
    model = random_model(mixed_config())
    layers = model.model.layers
    assert layers[1].self_attn.k_proj.weight.shape == (16, 64)  # 1 KV head x head_dim 16
    assert layers[1].mlp.gate_proj.weight.shape == (256, 64)
    assert layers[2].self_attn.linear_attn.weight.shape == (64, 64)
    assert layers[2].mlp.linear_mlp.weight.shape == (64, 64)
    assert layers[4].self_attn.v_proj.weight.shape == (32, 64)


def test_generate_with_kv_cache_equals_step_by_step_full_forward() -> None:
    model = random_model(mixed_config(), seed=3)
    prompt = torch.randint(3, 256, (1, 7))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
        seq = prompt
        for _ in range(12):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_cache_logits_match_full_forward_for_every_position() -> None:
    model = random_model(mixed_config(), seed=4)
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        step = model(ids[:, 5:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_mixed_child_exports_and_reloads_in_a_fresh_process_with_identical_logits(
    mixed_child, mixed_export: Path, tmp_path: Path
) -> None:
    _, model = mixed_child
    out = mixed_export
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    ids = torch.randint(3, 256, (2, 11))
    with torch.no_grad():
        expected = model(ids).logits
        expected_gen = model.generate(ids[:1], max_new_tokens=20, do_sample=False, min_new_tokens=20)
    result = run_in_fresh_process(out, ids.tolist(), tmp_path)
    assert result["class"] == "DeciLMForCausalLM" and "puzzle" not in result["module"]
    assert (result["logits"] - expected).abs().max().item() == 0.0
    assert torch.equal(result["generated"], expected_gen)


def test_exported_checkpoint_has_no_tensors_for_no_op_sub_blocks(mixed_export: Path) -> None:
    out = mixed_export
    names: set[str] = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as fh:
            names.update(fh.keys())
    assert not [
        n
        for n in names
        if n.startswith("model.layers.3.self_attn") or n.startswith("model.layers.3.input_layernorm")
    ]
    assert not [n for n in names if n.startswith("model.layers.4.mlp") or "layers.4.post_attention" in n]
    assert "model.layers.2.self_attn.linear_attn.weight" in names
    assert "model.layers.2.mlp.linear_mlp.weight" in names
    assert "model.layers.3.mlp.down_proj.weight" in names


def test_exported_config_has_exactly_the_nemotron_nas_fields(mixed_export: Path) -> None:
    out = mixed_export
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas"
    assert config["num_key_value_heads"] is None and config["intermediate_size"] is None
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_hidden_layers",
        "rope_theta",
        "vocab_size",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert key in config
    assert len(config["block_configs"]) == len(MIXED)
    for entry, block in zip(config["block_configs"], MIXED):
        assert set(entry) == {"attention", "ffn"}
        assert set(entry["attention"]) == {"n_heads_in_group", "no_op", "replace_with_linear"}
        assert set(entry["ffn"]) == {"ffn_mult", "no_op", "replace_with_linear"}
        if block.ffn.intermediate_size is not None:
            assert (
                engine_ffn_width(entry["ffn"]["ffn_mult"], config["hidden_size"])
                == block.ffn.intermediate_size
            )
        if block.attention.num_kv_heads is not None:
            assert (
                config["num_attention_heads"] // entry["attention"]["n_heads_in_group"]
                == block.attention.num_kv_heads
            )
    for name in ("modeling_decilm.py", "configuration_decilm.py", "block_config.py"):
        assert (out / name).exists()
    report = (out / "EXPORT_REPORT.md").read_text()
    assert "vLLM (nemotron_nas): no" in report and "layer 2 use a linear attention" in report
    assert "TensorRT-LLM (NemotronNASForCausalLM): yes" in report
