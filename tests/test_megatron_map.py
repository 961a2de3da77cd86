"""gkd.backend nemo, the parts that need no GPU: our child <-> Megatron-core's heterogeneous GPT model
(block configs, model configs, weights), the setting, and the backend's refusals before it imports
NeMo. The numerical check (the same logits in both models) needs Megatron-core and runs in
benchmarks/bench_nemo.py on a GPU."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from puzzle.child import megatron_map as mm
from puzzle.config import ConfigError, GKDConfig
from puzzle.modeling import DeciLMConfig, DeciLMForCausalLM
from puzzle.modeling.block_config import AttentionConfig, BlockConfig, FFNConfig

BLOCKS: list[Any] = [
    BlockConfig(attention=AttentionConfig(num_kv_heads=2), ffn=FFNConfig(intermediate_size=96)),
    BlockConfig(attention=AttentionConfig(no_op=True), ffn=FFNConfig(linear=True)),
    BlockConfig(attention=AttentionConfig(linear=True), ffn=FFNConfig(no_op=True)),
    BlockConfig(attention=AttentionConfig(num_kv_heads=4), ffn=FFNConfig(intermediate_size=256)),
]


def config(**extra: Any) -> DeciLMConfig:
    kw: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "block_configs": BLOCKS,
    }
    return DeciLMConfig(**(kw | extra))


def state(cfg: DeciLMConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DeciLMForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return {k: v.clone() for k, v in model.state_dict().items()}


LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# The parameters of Megatron-core 0.16.1's GPTModel for config() with the local heterogeneous spec
# (read from the real model; `_extra_state` entries left out).
MEGATRON_SHAPES = {
    "embedding.word_embeddings.weight": (128, 64),
    "decoder.layers.0.input_layernorm.weight": (64,),
    "decoder.layers.0.self_attention.linear_qkv.weight": (128, 64),
    "decoder.layers.0.self_attention.linear_proj.weight": (64, 64),
    "decoder.layers.0.pre_mlp_layernorm.weight": (64,),
    "decoder.layers.0.mlp.linear_fc1.weight": (192, 64),
    "decoder.layers.0.mlp.linear_fc2.weight": (64, 96),
    "decoder.layers.1.pre_mlp_layernorm.weight": (64,),
    "decoder.layers.1.mlp.weight": (64, 64),
    "decoder.layers.2.input_layernorm.weight": (64,),
    "decoder.layers.2.self_attention.weight": (64, 64),
    "decoder.layers.3.input_layernorm.weight": (64,),
    "decoder.layers.3.self_attention.linear_qkv.weight": (192, 64),
    "decoder.layers.3.self_attention.linear_proj.weight": (64, 64),
    "decoder.layers.3.pre_mlp_layernorm.weight": (64,),
    "decoder.layers.3.mlp.linear_fc1.weight": (512, 64),
    "decoder.layers.3.mlp.linear_fc2.weight": (64, 256),
    "decoder.final_layernorm.weight": (64,),
    "output_layer.weight": (128, 64),
}


def test_block_configs_map_to_megatron_with_explicit_sizes_and_back() -> None:
    cfg = config()
    doc = mm.heterogeneous_json(cfg)
    assert doc["block_configs"][0] == {
        "attention": {"no_op": False, "replace_with_linear": False, "num_query_groups": 2},
        "ffn": {"no_op": False, "replace_with_linear": False, "ffn_hidden_size": 96},
    }
    assert doc["block_configs"][1]["attention"] == {
        "no_op": True,
        "replace_with_linear": False,
        "num_query_groups": None,
    }
    assert doc["block_configs"][2]["attention"]["replace_with_linear"] is True
    assert mm.blocks_from_heterogeneous(doc) == BLOCKS
    assert mm.blocks_from_heterogeneous(json.dumps(doc)) == BLOCKS  # as Megatron stores it
    # Megatron derives a width from ffn_mult only for multiples of 256: 96 must be written out.
    assert cfg.block_configs[0]["ffn"]["intermediate_size"] == 96
    with pytest.raises(mm.MegatronMappingError, match="explicit num_query_groups"):
        mm.blocks_from_heterogeneous({"block_configs": cfg.block_configs})


def test_model_config_maps_to_megatron_kwargs() -> None:
    tk = mm.transformer_kwargs(config(rms_norm_eps=1e-5, qkv_bias=True, qk_norm=True))
    assert tk["num_layers"] == 4 and tk["hidden_size"] == 64 and tk["num_attention_heads"] == 4
    assert tk["kv_channels"] == 16 and tk["normalization"] == "RMSNorm" and tk["gated_linear_unit"] is True
    assert tk["layernorm_epsilon"] == 1e-5 and tk["add_qkv_bias"] is True and tk["qk_layernorm"] is True
    assert tk["add_bias_linear"] is False and tk["hidden_dropout"] == tk["attention_dropout"] == 0.0
    assert json.loads(tk["heterogeneous_layers_config_encoded_json"]) == mm.heterogeneous_json(config())
    gk = mm.gpt_kwargs(config(tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=256))
    assert gk == {
        "vocab_size": 128,
        "max_sequence_length": 256,
        "position_embedding_type": "rope",
        "rotary_base": 500000.0,
        "rope_scaling": False,
        "rope_scaling_factor": 8.0,
        "share_embeddings_and_output_weights": True,
    }
    llama3 = dict(LLAMA3, factor=32.0)
    gk = mm.gpt_kwargs(config(rope_parameters=llama3, max_position_embeddings=131072))
    assert gk["rope_scaling"] is True and gk["rope_scaling_factor"] == 32.0


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"sliding_window": 32}, "sliding_window"),
        ({"o_proj_bias": True}, "o_proj_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
        (
            {"rope_parameters": dict(LLAMA3, low_freq_factor=2.0), "max_position_embeddings": 131072},
            "low_freq_factor",
        ),
    ],
)
def test_what_megatron_cannot_represent_is_refused_with_the_reason(extra: dict, reason: str) -> None:
    cfg = config(**extra)
    for fn in (mm.transformer_kwargs, mm.gpt_kwargs):
        with pytest.raises(mm.MegatronMappingError, match=reason) as err:
            fn(cfg)
        assert "gkd.backend torch" in str(err.value)


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"qkv_bias": True, "qk_norm": True}])
def test_weights_map_to_megatron_names_and_shapes_and_back_bit_for_bit(extra: dict) -> None:
    cfg = config(**extra)
    ours = state(cfg)
    theirs = mm.to_megatron(dict(ours), cfg)
    expected = dict(MEGATRON_SHAPES)
    if extra.get("tie_word_embeddings"):
        del expected["output_layer.weight"]
    if extra.get("qkv_bias"):
        expected["decoder.layers.0.self_attention.linear_qkv.bias"] = (128,)
        expected["decoder.layers.3.self_attention.linear_qkv.bias"] = (192,)
        for i in (0, 3):
            expected[f"decoder.layers.{i}.self_attention.q_layernorm.weight"] = (16,)
            expected[f"decoder.layers.{i}.self_attention.k_layernorm.weight"] = (16,)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == expected
    with_extra: dict[str, Any] = {**theirs, "decoder.layers.0.mlp.linear_fc1._extra_state": None}
    back = mm.from_megatron(with_extra, cfg)  # Megatron's state dict has such entries
    assert set(back) == set(ours)
    for k in ours:
        assert torch.equal(back[k], ours[k]), k


def test_query_key_value_are_interleaved_per_query_group_and_gate_precedes_up() -> None:
    cfg = config()
    ours = state(cfg)
    theirs = mm.to_megatron(dict(ours), cfg)
    qkv = theirs["decoder.layers.0.self_attention.linear_qkv.weight"].reshape(2, 4, 16, 64)  # 2 groups
    q = ours["model.layers.0.self_attn.q_proj.weight"].reshape(2, 2, 16, 64)  # 2 query heads a group
    k = ours["model.layers.0.self_attn.k_proj.weight"].reshape(2, 16, 64)
    v = ours["model.layers.0.self_attn.v_proj.weight"].reshape(2, 16, 64)
    for g in range(2):
        assert torch.equal(qkv[g, :2], q[g]) and torch.equal(qkv[g, 2], k[g]) and torch.equal(qkv[g, 3], v[g])
    fc1 = theirs["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:96], ours["model.layers.0.mlp.gate_proj.weight"])  # SwiGLU: act(first) * second
    assert torch.equal(fc1[96:], ours["model.layers.0.mlp.up_proj.weight"])


def test_missing_or_foreign_weights_are_refused() -> None:
    cfg = config()
    ours = state(cfg)
    with pytest.raises(mm.MegatronMappingError, match="no 'model.norm.weight'"):
        mm.to_megatron({k: v for k, v in ours.items() if k != "model.norm.weight"}, cfg)
    with pytest.raises(mm.MegatronMappingError, match="no place"):
        mm.to_megatron({**ours, "model.layers.1.self_attn.q_proj.weight": torch.zeros(1)}, cfg)
    theirs = mm.to_megatron(dict(ours), cfg)
    with pytest.raises(mm.MegatronMappingError, match="no place in our model"):
        mm.from_megatron({**theirs, "decoder.layers.1.self_attention.linear_qkv.weight": torch.zeros(1)}, cfg)


def test_the_loss_hooks_the_hidden_states_our_loss_compares() -> None:
    # Ours: hidden_states[1:] = the outputs of layers 0..L-2 and the final norm's.
    assert mm.layer_outputs(config()) == [
        "decoder.layers.0",
        "decoder.layers.1",
        "decoder.layers.2",
        "decoder.final_layernorm",
    ]


def test_backend_setting_is_validated() -> None:
    assert GKDConfig().backend == "torch"
    GKDConfig(backend="nemo").check("gkd")
    with pytest.raises(ConfigError, match="gkd.backend"):
        GKDConfig(backend="megatron").check("gkd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="gkd.nodes.*backend nemo"):
        GKDConfig(backend="nemo", nodes=2).check("gkd")


def test_nemo_backend_refuses_what_it_cannot_run_before_importing_nemo() -> None:
    from puzzle.child import gkd_nemo
    from puzzle.child.gkd import DistillError, ModelSpec
    from puzzle.child.parallel import DistInfo

    spec = ModelSpec(config())
    ids = torch.zeros((4, 8), dtype=torch.int32)
    settings = GKDConfig(backend="nemo")
    with pytest.raises(DistillError, match="one GPU"):
        gkd_nemo.train(
            spec, spec, ids, settings, device=torch.device("cpu"), work_dir=None, dist_info=DistInfo(0, 2)
        )
    with pytest.raises(DistillError, match="needs a CUDA device"):
        gkd_nemo.train(spec, spec, ids, settings, device=torch.device("cpu"), work_dir=None)
    with pytest.raises(DistillError, match="is empty"):
        gkd_nemo.train(spec, spec, ids[:0], settings, device=torch.device("cpu"), work_dir=None)


def test_the_nemo_backend_says_what_is_missing_before_any_model_loads() -> None:
    import importlib.util

    from puzzle.child.gkd import DistillError, check_nemo_installed

    if all(importlib.util.find_spec(m.split(".")[0]) for m in ("nemo", "megatron", "modelopt")):
        pytest.skip("NeMo is installed here")
    missing = r"gkd.backend is 'nemo' but .*puzzle-nemo image.*gkd.backend: torch"
    with pytest.raises(DistillError, match=missing):
        check_nemo_installed()
