"""The serving-style generation loop: same greedy tokens as the model, static cache, clear errors."""

from __future__ import annotations

import pytest
import torch

from puzzle.modeling import BlockConfig, DeciLMConfig, DeciLMForCausalLM
from puzzle.modeling.checkpoints import count_parameters
from puzzle.modeling.devices import DeviceError
from puzzle.modeling.engine import (
    EngineError,
    EngineWeights,
    Session,
    copy_bandwidth,
    decode_contexts,
    hardware_identity,
    measure_throughput,
)

# Every kind of sub-block: GQA with 2, 1 and 4 KV heads, linear and no-op attention, SwiGLU of two
# widths, linear and no-op FFN.
BLOCKS = [
    "attn_kv2+ffn_128",
    "attn_linear+ffn_64",
    "attn_noop+ffn_linear",
    "attn_kv1+ffn_noop",
    "attn_kv4+ffn_128",
]
CPU = torch.device("cpu")


def tiny_model(*, seed: int = 0, blocks: list[str] = BLOCKS, **extra) -> DeciLMForCausalLM:
    torch.manual_seed(seed)
    parsed = [BlockConfig.from_name(n) for n in blocks]
    config = DeciLMConfig(
        vocab_size=256,
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=len(parsed),
        block_configs=[b.to_json(hidden_size=64, num_attention_heads=4) for b in parsed],
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
        **extra,
    )
    model = DeciLMForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so that greedy tokens vary
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"qkv_bias": True, "tie_word_embeddings": True},  # Qwen2-like
        {
            "qk_norm": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },  # Qwen3 norms, Llama-3 RoPE
    ],
    ids=["llama", "qwen2", "qwen3-llama3rope"],
)
def test_greedy_tokens_equal_model_generate(extra: dict) -> None:
    model = tiny_model(**extra)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)[:, ids.shape[1] :]
    assert len(set(expected.flatten().tolist())) > 3  # a real sequence, not one repeated token
    weights = EngineWeights.from_model(model, device=CPU, dtype=torch.float32)
    # Attention over exactly the filled prefix (CPU default), and over a bucketed cache with the
    # unfilled tail masked (what the CUDA graphs do).
    for bucket, capacity in ((1, 25), (16, 32)):
        session = Session(weights, batch_size=3, max_len=25, bucket=bucket)
        assert torch.equal(session.generate(ids, 16), expected)
        # The static cache holds one K and one V per GQA layer only, sized to the bucketed capacity.
        assert session.capacity == capacity and [t.shape[1] for t in session.k_cache] == [2, 1, 4]


def test_a_session_is_reusable_and_a_second_batch_gives_the_same_tokens() -> None:
    model = tiny_model(seed=3)
    weights = EngineWeights.from_model(model, device=CPU, dtype=torch.float32)
    session = Session(weights, batch_size=2, max_len=24)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    first = session.generate(ids, 12)
    other = session.generate(torch.randint(0, 256, (2, 8)), 12)
    assert torch.equal(session.generate(ids, 12), first) and other.shape == first.shape


def test_engine_weights_are_fused_copies_and_leave_the_model_alone() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = EngineWeights.from_model(model, device=CPU, dtype=torch.float32)
    assert weights.parameter_bytes() == count_parameters(model) * 4
    first = model.model.layers[0]
    assert torch.equal(
        weights.layers[0].attention.qkv,
        torch.cat(
            [first.self_attn.q_proj.weight, first.self_attn.k_proj.weight, first.self_attn.v_proj.weight]
        ),
    )
    assert torch.equal(
        weights.layers[0].ffn.gate_up, torch.cat([first.mlp.gate_proj.weight, first.mlp.up_proj.weight])
    )
    assert weights.layers[2].attention is None and weights.layers[3].ffn is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Random weights of a config have the same layout and size.
    rand = EngineWeights.random(model.config, device=CPU, dtype=torch.bfloat16)
    assert rand.parameter_bytes() == count_parameters(model) * 2 and rand.num_slots == 3


def test_measure_throughput_reports_the_contract() -> None:
    model = tiny_model()
    result = measure_throughput(model, batch_size=2, prompt_len=8, gen_len=5, device="cpu", repeats=2)
    for key in (
        "throughput",
        "decode_throughput",
        "prefill_s",
        "decode_s",
        "total_s",
        "peak_memory_bytes",
        "device_name",
        "kv_cache_bytes",
        "decode_bytes_per_step",
    ):
        assert key in result
    assert result["throughput"] == pytest.approx(2 * 5 / result["total_s"])
    assert result["total_s"] == pytest.approx(result["prefill_s"] + result["decode_s"], rel=0.5)
    assert result["graphs"] is False and result["dtype"] == "float32" and result["peak_memory_bytes"] is None
    # KV cache: batch x 13 positions x (2 + 1 + 4 KV heads) x head_dim 16 x K and V x 4 bytes.
    assert result["kv_cache_bytes"] == 2 * 13 * 7 * 16 * 2 * 4


def test_bad_workloads_and_devices_are_clear_errors() -> None:
    model = tiny_model()
    with pytest.raises(EngineError, match="gen_len must be a positive integer"):
        measure_throughput(model, batch_size=1, prompt_len=4, gen_len=0, device="cpu", repeats=1)
    with pytest.raises(DeviceError, match="dtype"):
        measure_throughput(
            model, batch_size=1, prompt_len=4, gen_len=2, device="cpu", repeats=1, dtype="int8"
        )
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            measure_throughput(model, batch_size=1, prompt_len=4, gen_len=2, device="cuda", repeats=1)
    weights = EngineWeights.from_model(model, device=CPU, dtype=torch.float32)
    with pytest.raises(EngineError, match="CUDA graphs need a CUDA device"):
        Session(weights, batch_size=1, max_len=8, graphs=True)
    session = Session(weights, batch_size=1, max_len=8)
    with pytest.raises(EngineError, match="prompt batch is 2"):
        session.prefill(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(EngineError, match="exceeds the session's capacity"):
        session.bucket_for(9)


def test_workload_contexts_and_hardware_identity() -> None:
    # Prefill of 4 tokens gives token 1; steps 2..5 feed positions 4..7 and read 5..8 positions.
    assert decode_contexts(4, 5) == [5, 6, 7, 8]
    assert decode_contexts(4, 1) == []
    hw = hardware_identity(CPU, torch.float32)
    assert hw["device_type"] == "cpu" and hw["torch"] == torch.__version__ and hw["dtype"] == "float32"
    assert hw["backend"] == "torch" and hw["device_name"] and hw["host"]
    assert copy_bandwidth(CPU, megabytes=8, iters=2) > 0
