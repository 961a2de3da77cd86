"""Block configs convert exactly to and from the Nemotron-NAS ``block_configs`` JSON."""

from __future__ import annotations

import pytest

from puzzle.modeling.block_config import (
    AttentionConfig,
    BlockConfig,
    BlockConfigError,
    FFNConfig,
    engine_ffn_width,
    ffn_mult_for_width,
    parse_block_configs,
)


@pytest.mark.parametrize("hidden", [64, 576, 896, 2048, 4096, 5120, 8192])
def test_every_multiple_of_256_width_round_trips_through_the_engines_formula(hidden: int) -> None:
    for width in range(256, 8 * hidden + 1, 256):
        mult = ffn_mult_for_width(width, hidden)
        assert mult is not None, (width, hidden)
        assert engine_ffn_width(mult, hidden) == width


def test_known_parent_widths_get_the_published_multipliers() -> None:
    assert ffn_mult_for_width(28672, 8192) == 5.25  # Llama-3.x-70B
    assert ffn_mult_for_width(1536, 576) == 4.0  # SmolLM2-135M
    assert ffn_mult_for_width(14336, 4096) == 5.25  # Llama-3.1-8B


def test_width_not_multiple_of_256_is_kept_exactly_and_flagged() -> None:
    ffn = FFNConfig(intermediate_size=1000)
    assert ffn_mult_for_width(1000, 64) is None
    data = ffn.to_json(64)
    assert data["intermediate_size"] == 1000
    assert FFNConfig.from_json(data, 64) == ffn
    assert not ffn.engine_expressible


@pytest.mark.parametrize(
    "block",
    [
        BlockConfig(attention=AttentionConfig(num_kv_heads=2), ffn=FFNConfig(intermediate_size=512)),
        BlockConfig(attention=AttentionConfig(linear=True), ffn=FFNConfig(linear=True)),
        BlockConfig(attention=AttentionConfig(no_op=True), ffn=FFNConfig(no_op=True)),
        BlockConfig(attention=AttentionConfig(num_kv_heads=8), ffn=FFNConfig(no_op=True)),
    ],
)
def test_json_and_name_round_trip(block: BlockConfig) -> None:
    data = block.to_json(hidden_size=256, num_attention_heads=8)
    assert set(data) == {"attention", "ffn"}
    assert set(data["attention"]) == {"n_heads_in_group", "no_op", "replace_with_linear"}
    assert set(data["ffn"]) == {"ffn_mult", "no_op", "replace_with_linear"}
    assert BlockConfig.from_json(data, hidden_size=256, num_attention_heads=8) == block
    assert BlockConfig.from_name(block.name) == block


def test_n_heads_in_group_is_heads_over_kv_heads() -> None:
    data = AttentionConfig(num_kv_heads=8).to_json(64)
    assert data["n_heads_in_group"] == 8
    assert AttentionConfig(no_op=True).to_json(64)["n_heads_in_group"] is None


def test_kv_heads_that_do_not_divide_the_head_count_are_rejected_with_the_choices() -> None:
    with pytest.raises(
        BlockConfigError, match=r"does not divide num_attention_heads=9; use one of \[9, 3, 1\]"
    ):
        AttentionConfig(num_kv_heads=2).to_json(9)


@pytest.mark.parametrize(
    "bad", [dict(intermediate_size=-5), dict(intermediate_size=0), dict(linear=True, no_op=True), {}]
)
def test_invalid_ffn_configs_name_the_field(bad: dict) -> None:
    with pytest.raises(BlockConfigError, match="ffn"):
        FFNConfig(**bad)


def test_invalid_attention_configs_name_the_field() -> None:
    with pytest.raises(BlockConfigError, match="num_kv_heads"):
        AttentionConfig(num_kv_heads=-1)
    with pytest.raises(BlockConfigError, match="n_heads_in_group"):
        AttentionConfig.from_json({"n_heads_in_group": 5, "no_op": False, "replace_with_linear": False}, 8)


def test_block_configs_length_must_match_layers() -> None:
    block = BlockConfig(attention=AttentionConfig(num_kv_heads=1), ffn=FFNConfig(intermediate_size=256))
    with pytest.raises(BlockConfigError, match="one entry per layer"):
        parse_block_configs([block], hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
