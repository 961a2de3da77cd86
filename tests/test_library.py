"""Block library: search space validation, initialisation from the parent, assembling children."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from puzzle.config import ConfigError, DataConfig, LibraryConfig, parse_section
from puzzle.data import load_split, prepare
from puzzle.library.variants import (
    PAPER_LIBRARY,
    Library,
    LibraryError,
    assemble_child,
    attention_variants,
    block_state,
    build_library,
    calibrate,
    channel_contribution,
    ffn_variants,
    ffn_widths_for,
    kv_heads_for,
    pool_kv_heads,
)
from puzzle.modeling import BlockConfig
from puzzle.modeling.checkpoints import load_model
from puzzle.modeling.layers import LayerRunner, build_layer, sub_blocks

# Written in float32, so that the initialisations are checked exactly (float16, the default, in
# tests/test_footprint.py).
SPACE = replace(PAPER_LIBRARY, ffn_fractions=[1.0, 0.5, 0.25], save_dtype="float32")


@pytest.fixture(scope="module")
def tiny(tiny_parent_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama parent (4 heads, 2 KV heads, FFN 192: not a multiple of 256), its tokens and library."""
    from puzzle.parent import convert

    root = tmp_path_factory.mktemp("lib-tiny")
    convert(str(tiny_parent_factory("llama", intermediate_size=192)), str(root / "parent"))
    prepare(
        str(root / "parent"),
        str(root / "tokens"),
        DataConfig(seq_len=32, splits={"calibration": 16, "score": 8}),
    )
    build_library(str(root / "parent"), str(root / "tokens"), str(root / "lib"), SPACE)
    return {"parent": str(root / "parent"), "tokens": str(root / "tokens"), "lib": str(root / "lib")}


def test_search_space_widths_and_kv_heads() -> None:
    space = PAPER_LIBRARY
    assert kv_heads_for(space, 9, 3) == [3, 1]  # SmolLM2
    assert kv_heads_for(space, 32, 8) == [8, 4, 2, 1]  # Llama-3.1-8B
    assert ffn_widths_for(space, 1536) == [1536, 1280, 768, 512, 256]  # multiples of 256
    assert ffn_widths_for(space, 14336) == [14336, 12544, 10752, 7168, 3584, 2816, 1536]
    assert ffn_widths_for(space, 192) == [192, 168, 144, 96, 48, 38, 19]  # parent width not a multiple: exact
    names = [v.name for v in attention_variants(space, 9, 3)] + [v.name for v in ffn_variants(space, 1536)]
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
    # The parent's own sub-blocks are always there, even when the space leaves them out.
    narrow = replace(PAPER_LIBRARY, kv_heads=[1], ffn_fractions=[0.5], attention_linear=False, ffn_noop=False)
    assert kv_heads_for(narrow, 9, 3) == [3, 1] and ffn_widths_for(narrow, 1536) == [1536, 768]
    # Round trip through JSON, as the library artifact records it.
    assert parse_section("library", json.loads(json.dumps(dataclasses.asdict(narrow)))) == narrow


def test_impossible_search_spaces_are_clear_errors(tiny: dict[str, str]) -> None:
    with pytest.raises(
        LibraryError, match=r"2 does not divide the parent's 9 attention heads; use some of \[3, 1\]"
    ):
        kv_heads_for(replace(PAPER_LIBRARY, kv_heads=[2]), 9, 3)
    with pytest.raises(LibraryError, match="more than the parent's 2 KV heads"):
        kv_heads_for(replace(PAPER_LIBRARY, kv_heads=[4]), 4, 2)
    with pytest.raises(ConfigError, match=r"library\.ffn_fractions\[1\] must be in \(0, 1\], got 1\.5"):
        LibraryConfig(ffn_fractions=[1.0, 1.5])
    with pytest.raises(ConfigError, match=r"library\.ffn_fractions\[0\] must be in \(0, 1\], got 0\.0"):
        LibraryConfig(ffn_fractions=[0.0])
    with pytest.raises(ConfigError, match=r"unknown field library\.attention_kv_heads"):
        parse_section("library", {"attention_kv_heads": [1]})
    # Raised before any weights or tokens are read (the tokens path does not even exist).
    with pytest.raises(LibraryError, match="does not divide"):
        build_library(
            tiny["parent"],
            "/nonexistent/tokens",
            "/nonexistent/out",
            replace(PAPER_LIBRARY, kv_heads=[3]),
        )
    with pytest.raises(LibraryError, match="not a layer of the parent"):
        build_library(tiny["parent"], "/nonexistent/tokens", "/nonexistent/out", SPACE, layers=[7])


def test_kv_pooling_averages_the_heads_each_group_used() -> None:
    weight = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(
        4 * 2, 3
    )  # 4 KV heads, head_dim 2, hidden 3
    pooled = pool_kv_heads(weight, num_heads=8, parent_kv=4, new_kv=2, head_dim=2)
    heads = weight.reshape(4, 2, 3)
    assert torch.equal(pooled.reshape(2, 2, 3), torch.stack([heads[:2].mean(0), heads[2:].mean(0)]))
    # Keeping the parent's count is the identity.
    assert torch.equal(pool_kv_heads(weight, num_heads=8, parent_kv=4, new_kv=4, head_dim=2), weight)


def test_library_holds_every_variant_initialised_from_the_parent(tiny: dict[str, str]) -> None:
    lib = Library.open(tiny["lib"])
    parent = load_model(tiny["parent"])
    assert lib.layers == [0, 1, 2]
    assert lib.variants(1) == [
        "attn_kv2",
        "attn_kv1",
        "attn_linear",
        "attn_noop",
        "ffn_192",
        "ffn_96",
        "ffn_48",
        "ffn_linear",
        "ffn_noop",
    ]
    layer_state = parent.model.layers[1].state_dict()
    # The parent's own sub-blocks are listed, not stored: their weights are the parent's.
    assert lib.parent_weights(1, "attn_kv2") and lib.parent_weights(1, "ffn_192")
    with pytest.raises(LibraryError, match="attn_kv2 is the parent's own sub-block"):
        lib.load(1, "attn_kv2")
    own = block_state(lib, 1, BlockConfig.from_name("attn_kv2+ffn_96"), layer_state)
    for name in [k for k in layer_state if k.startswith(("input_layernorm.", "self_attn."))]:
        assert own[name] is layer_state[name]
    assert lib.load(1, "attn_noop") == {} and lib.load(1, "ffn_noop") == {}
    kv1 = lib.load(1, "attn_kv1")
    assert kv1["self_attn.k_proj.weight"].shape == (16, 64)  # one KV head of dim 16
    assert torch.allclose(
        kv1["self_attn.v_proj.weight"], layer_state["self_attn.v_proj.weight"].reshape(2, 16, 64).mean(0)
    )
    assert lib.load(1, "ffn_96")["mlp.down_proj.weight"].shape == (64, 96)
    assert (
        lib.info(1, "ffn_96")["init"] == "channel_contribution"
        and lib.info(1, "ffn_linear")["init"] == "least_squares"
    )
    with pytest.raises(LibraryError, match="no variant 'ffn_7'"):
        lib.load(1, "ffn_7")


def test_narrow_ffn_keeps_the_channels_with_the_largest_contribution(tiny: dict[str, str]) -> None:
    lib = Library.open(tiny["lib"])
    parent = load_model(tiny["parent"])
    stats = calibrate(parent, load_split(tiny["tokens"], "calibration"), [2], need_lstsq=False)
    mlp = parent.model.layers[2].mlp
    contribution = channel_contribution(
        (stats.abs_activation[2] / stats.tokens).float(), mlp.down_proj.weight
    )
    keep = contribution.argsort(descending=True)[:48].sort().values
    assert torch.equal(lib.load(2, "ffn_48")["mlp.gate_proj.weight"], mlp.gate_proj.weight[keep])
    assert torch.equal(lib.load(2, "ffn_48")["mlp.down_proj.weight"], mlp.down_proj.weight[:, keep])


def test_linear_variants_reproduce_what_they_approximate(tiny: dict[str, str]) -> None:
    lib = Library.open(tiny["lib"])
    parent = load_model(tiny["parent"])
    runner = LayerRunner(parent)
    config = parent.config
    # One token attends only to itself, where W_O . W_V is exact.
    hidden, ctx = runner.embed(torch.tensor([[5]]))
    full = sub_blocks(parent.model.layers[0], hidden, ctx).attn_delta
    linear = build_layer(config, BlockConfig.from_name("attn_linear+ffn_noop"), lib.load(0, "attn_linear"))
    assert torch.allclose(sub_blocks(linear, hidden, ctx).attn_delta, full, atol=1e-5)
    # The least-squares linear FFN explains most of the parent FFN's output on calibration text.
    ids = load_split(tiny["tokens"], "calibration")
    hidden, ctx = runner.embed(ids)
    parts = sub_blocks(parent.model.layers[0], hidden, ctx)
    state = block_state(
        lib, 0, BlockConfig.from_name("attn_kv2+ffn_linear"), parent.model.layers[0].state_dict()
    )
    child = sub_blocks(build_layer(config, BlockConfig.from_name("attn_kv2+ffn_linear"), state), hidden, ctx)
    nmse = (child.ffn_delta - parts.ffn_delta).pow(2).sum() / parts.ffn_delta.pow(2).sum()
    assert float(nmse.detach()) < 0.5


def test_assemble_child_from_library(tiny: dict[str, str]) -> None:
    parent = load_model(tiny["parent"])
    ids = load_split(tiny["tokens"], "score")
    same = assemble_child(tiny["parent"], tiny["lib"], parent.config.blocks)
    with torch.no_grad():
        assert torch.equal(same(ids).logits, parent(ids).logits)
    blocks = [
        BlockConfig.from_name(n) for n in ("attn_kv1+ffn_96", "attn_noop+ffn_linear", "attn_linear+ffn_noop")
    ]
    child = assemble_child(parent, tiny["lib"], blocks)
    assert [b.name for b in child.config.blocks] == [b.name for b in blocks]
    assert child.model.layers[1].self_attn is None and child.model.layers[2].mlp is None
    with torch.no_grad():
        assert torch.isfinite(child(ids).logits).all()
    with pytest.raises(LibraryError, match="variant ffn_100 is not in library"):
        assemble_child(parent, tiny["lib"], [BlockConfig.from_name("attn_kv2+ffn_100")] * 3)


def test_library_and_parent_mismatch_is_a_clear_error(
    tiny: dict[str, str], tiny_parent_factory, tmp_path: Path
) -> None:
    from puzzle.parent import convert

    convert(str(tiny_parent_factory("llama", seed=1, intermediate_size=192)), str(tmp_path / "other-weights"))
    convert(
        str(tiny_parent_factory("llama", num_hidden_layers=2, intermediate_size=192)),
        str(tmp_path / "other-shape"),
    )
    parent_blocks = load_model(tiny["parent"]).config.blocks
    with pytest.raises(LibraryError, match="built from other weights"):
        assemble_child(str(tmp_path / "other-weights"), tiny["lib"], parent_blocks)
    with pytest.raises(LibraryError, match="num_hidden_layers is 3 in the library but 2 in the parent"):
        assemble_child(str(tmp_path / "other-shape"), tiny["lib"], parent_blocks[:2])


@pytest.mark.integration
def test_channel_contribution_beats_random_channels_on_smollm2(
    smollm2_parent: Path, smollm2_tokens: Path, tmp_path: Path
) -> None:
    """50 % FFN width (ffn_768 of 1536) in three layers, channels ranked on 8 x 64 calibration tokens:
    replace-1-block KL on 4 held-out sequences."""
    from puzzle.library.scoring import Row, score_rows

    space = LibraryConfig(
        kv_heads=[3],
        attention_linear=False,
        attention_noop=False,
        ffn_fractions=[0.5],
        ffn_linear=False,
        ffn_noop=False,
    )
    parent = load_model(str(smollm2_parent))
    held_out = load_split(str(smollm2_tokens), "score")[:4]
    layers = [20, 24, 28]
    kl = {}
    for init in ("channel_contribution", "random"):
        build_library(
            str(smollm2_parent),
            str(smollm2_tokens),
            str(tmp_path / init),
            replace(space, ffn_init=init),
            layers=layers,
            calibration_sequences=8,
        )
        rows = [Row(layer, BlockConfig.from_name("attn_kv3+ffn_768")) for layer in layers]
        table = score_rows(parent, Library.open(str(tmp_path / init)), rows, held_out, metrics=["kl_div"])
        kl[init] = {r["layer"]: r["kl_div"] for r in table}
    # Measured: 0.028 / 0.020 / 0.010 (channel contribution) vs 0.120 / 0.067 / 0.237 (random).
    for layer in layers:
        assert kl["channel_contribution"][layer] < kl["random"][layer], kl
