"""Serving engines: one set of rules for the export report and for `export.serve_with`, which keeps
out of the library every block a named engine cannot load."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from puzzle import serving
from puzzle.child.export import ENGINES, engine_verdicts
from puzzle.config import ConfigError, DataConfig, ExportConfig, LibraryConfig, load_config, parse_section
from puzzle.data import prepare
from puzzle.io import artifacts
from puzzle.library.variants import Library, LibraryError, build_library, restrict_to_engines
from puzzle.modeling import BlockConfig, DeciLMConfig
from puzzle.stages import stage

# Every kind of variant; for a parent of FFN width 512: widths 512, 384, 256 (384: no ffn_mult expresses it).
SPACE = LibraryConfig(
    kv_heads=[1], attention_linear=True, ffn_fractions=[1.0, 0.75, 0.5], ffn_multiple=128, ffn_linear=True
)


def _legacy_verdicts(config: DeciLMConfig) -> list[tuple[str, bool, list[str]]]:
    """The export report's rules as written before puzzle.serving held them (the reference)."""

    def where(predicate) -> list[int]:
        return [i for i, b in enumerate(config.blocks) if predicate(b)]

    def fmt(layers: list[int]) -> str:
        return (
            ("layer " if len(layers) == 1 else "layers ")
            + ", ".join(map(str, layers[:8]))
            + (", ..." if len(layers) > 8 else "")
        )

    lin_attn = where(lambda b: b.attention.linear)
    lin_ffn = where(lambda b: b.ffn.linear)
    odd = where(lambda b: not b.ffn.engine_expressible)
    extras = []
    if config.qk_norm:
        extras.append("q/k RMSNorm (Qwen3) is not read")
    if config.sliding_window:
        extras.append(f"sliding window {config.sliding_window} (Mistral) is not read")
    common = [f"{fmt(odd)} use FFN widths that ffn_mult cannot express (not multiples of 256)"] if odd else []
    vllm = common + extras
    if lin_attn:
        vllm.append(f"{fmt(lin_attn)} use a linear attention (replace_with_linear is not read)")
    if lin_ffn:
        vllm.append(f"{fmt(lin_ffn)} use a linear FFN (replace_with_linear is not read)")
    bias = (
        ["attention/MLP biases are not read"]
        if config.qkv_bias or config.o_proj_bias or config.mlp_bias
        else []
    )
    trt = common + extras + bias
    llama_cpp = common + extras + bias
    if lin_ffn:
        llama_cpp.append(
            f"{fmt(lin_ffn)} use a linear FFN (the DECI converter supports only linear attention)"
        )
    mlx = common + extras + bias
    names = (
        "vLLM (nemotron_nas)",
        "TensorRT-LLM (NemotronNASForCausalLM)",
        "llama.cpp (DECI)",
        "mlx-lm (nemotron-nas)",
    )
    return [(n, not r, r) for n, r in zip(names, (vllm, trt, llama_cpp, mlx))]


def _config(blocks: list[str], **features) -> DeciLMConfig:
    return DeciLMConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=len(blocks),
        block_configs=[BlockConfig.from_name(b) for b in blocks],
        **features,
    )


LAYOUTS = [
    ["attn_kv2+ffn_256"] * 4,
    ["attn_kv2+ffn_256", "attn_linear+ffn_256", "attn_kv1+ffn_linear", "attn_noop+ffn_noop"],
    ["attn_kv2+ffn_192", "attn_linear+ffn_linear", "attn_kv2+ffn_512", "attn_linear+ffn_96"],
    ["attn_kv2+ffn_linear"] * 10,  # more than 8 layers: the list is cut
]
FEATURES: list[dict[str, Any]] = [
    {},
    {"qk_norm": True},
    {"sliding_window": 4},
    {"qkv_bias": True},
    {"o_proj_bias": True, "mlp_bias": True},
    {"qk_norm": True, "qkv_bias": True, "sliding_window": 8},
]


@pytest.mark.parametrize(
    ("layout", "features"), list(itertools.product(range(len(LAYOUTS)), range(len(FEATURES))))
)
def test_export_verdicts_are_the_ones_the_report_gave_before(layout: int, features: int) -> None:
    config = _config(LAYOUTS[layout], **FEATURES[features])
    got = [(v.engine, v.servable, v.reasons) for v in engine_verdicts(config)]
    assert got == _legacy_verdicts(config)
    assert ENGINES == tuple(name for name, _, _ in got)


def test_verdicts_name_the_layers_and_engine_specific_rules() -> None:
    config = _config(LAYOUTS[2], qkv_bias=True)
    by_engine = {v.engine: v for v in engine_verdicts(config)}
    assert by_engine["vLLM (nemotron_nas)"].reasons == [
        "layers 0, 3 use FFN widths that ffn_mult cannot express (not multiples of 256)",
        "layers 1, 3 use a linear attention (replace_with_linear is not read)",
        "layer 1 use a linear FFN (replace_with_linear is not read)",
    ]
    assert by_engine["llama.cpp (DECI)"].reasons[1:] == [
        "attention/MLP biases are not read",
        "layer 1 use a linear FFN (the DECI converter supports only linear attention)",
    ]
    assert all(not v.servable for v in by_engine.values())
    assert all(v.servable for v in engine_verdicts(_config(LAYOUTS[0])))


def test_sub_block_and_model_rules_per_engine() -> None:
    block = BlockConfig.from_name("attn_linear+ffn_linear")
    assert serving.block_reasons("vllm", block) == [
        "attn_linear: a linear attention (replace_with_linear is not read)",
        "ffn_linear: a linear FFN (replace_with_linear is not read)",
    ]
    assert serving.block_reasons("llama.cpp", block) == [
        "ffn_linear: a linear FFN (the DECI converter supports only linear attention)"
    ]
    assert serving.block_reasons("trtllm", block) == [] and serving.block_reasons("mlx", block) == []
    odd = BlockConfig.from_name("attn_kv2+ffn_192")
    for key in serving.ENGINE_KEYS:
        assert serving.block_reasons(key, odd) == [
            "ffn_192: an FFN width that ffn_mult cannot express (not a multiple of 256)"
        ]
        assert serving.sub_block_reasons(key, odd.attention) == []
    biased = _config(["attn_kv2+ffn_256"], qkv_bias=True)
    assert serving.model_reasons("vllm", biased) == []  # vLLM reads qkv_bias / attention_bias
    assert serving.model_reasons("trtllm", biased) == ["attention/MLP biases are not read"]
    assert serving.feature_reasons("llama.cpp", "attention", "linear") == []
    with pytest.raises(
        ValueError, match="unknown serving engine 'sglang'; engines: vllm, trtllm, llama.cpp, mlx"
    ):
        serving.sub_block_reasons("sglang", odd.ffn)


# --------------------------------------------------------------------------- configuration


def test_unknown_engine_name_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(
        ConfigError, match=r"export\.serve_with\[1\] must be one of vllm, trtllm, llama\.cpp, mlx, got 'vLLM'"
    ):
        parse_section("export", {"serve_with": ["trtllm", "vLLM"]})
    with pytest.raises(ConfigError, match=r"export\.serve_with\[0\] must be one of"):
        load_config(None, ["export.serve_with=[sglang]"], check_access=False)
    with pytest.raises(ConfigError, match=r"export\.serve_with lists an engine twice"):
        ExportConfig(serve_with=["mlx", "mlx"])
    assert ExportConfig().serve_with == []
    assert parse_section("export", {"serve_with": ["llama.cpp", "mlx"]}).serve_with == ["llama.cpp", "mlx"]


def test_asking_for_a_variant_a_named_engine_cannot_load_is_refused_naming_both_fields() -> None:
    with pytest.raises(
        ConfigError,
        match=r"library\.attention_linear is true but export\.serve_with names 'vllm'.*set "
        r"library\.attention_linear: false, or remove 'vllm' from export\.serve_with",
    ):
        load_config(None, ["export.serve_with=[vllm]", "library.attention_linear=true"], check_access=False)
    with pytest.raises(
        ConfigError, match=r"library\.ffn_linear is true but export\.serve_with names 'llama\.cpp'"
    ):
        load_config(
            None, ["export.serve_with=[mlx, llama.cpp]", "library.ffn_linear=true"], check_access=False
        )
    # What the engine can load is fine: llama.cpp reads linear attention, TensorRT-LLM both.
    load_config(None, ["export.serve_with=[llama.cpp]", "library.attention_linear=true"], check_access=False)
    load_config(
        None,
        ["export.serve_with=[trtllm]", "library.attention_linear=true", "library.ffn_linear=true"],
        check_access=False,
    )


def test_the_library_stage_takes_the_export_section() -> None:
    config = load_config(None, ["export.serve_with=[vllm]"], check_access=False)
    args, kwargs = stage("library").arguments(config, {"parent": "p", "tokens": "t"})
    assert args == ["p", "t"] and kwargs["export"].serve_with == ["vllm"]
    assert kwargs["library"] == config.library


# --------------------------------------------------------------------------- the library


@pytest.fixture(scope="module")
def parent(tiny_parent_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny Llama parent (FFN 512: every engine can serve it) and its tokens."""
    from puzzle.parent import convert

    root = tmp_path_factory.mktemp("serving")
    convert(str(tiny_parent_factory("llama", intermediate_size=512)), str(root / "parent"))
    prepare(
        str(root / "parent"),
        str(root / "tokens"),
        DataConfig(seq_len=32, splits={"calibration": 8, "score": 4}),
    )
    return {"parent": str(root / "parent"), "tokens": str(root / "tokens"), "root": str(root)}


def _build(
    parent: dict[str, str], name: str, serve_with: list[str] | None
) -> tuple[Library, artifacts.Manifest]:
    out = str(Path(parent["root"]) / name)
    export = None if serve_with is None else ExportConfig(serve_with=serve_with)
    manifest = build_library(parent["parent"], parent["tokens"], out, SPACE, export=export)
    return Library.open(out), manifest


ALL_VARIANTS = [
    "attn_kv2",
    "attn_kv1",
    "attn_linear",
    "attn_noop",
    "ffn_512",
    "ffn_384",
    "ffn_256",
    "ffn_linear",
    "ffn_noop",
]


def test_an_unrestricted_library_holds_every_variant_and_keeps_its_parameters(parent: dict[str, str]) -> None:
    lib, manifest = _build(parent, "any", None)
    for layer in lib.layers:
        assert lib.variants(layer) == ALL_VARIANTS
    assert "serve_with" not in manifest.parameters and "serving" not in lib.meta
    # An empty serve_with is the same library: same parameters, so not even rebuilt.
    again = build_library(
        parent["parent"], parent["tokens"], str(Path(parent["root"]) / "any"), SPACE, export=ExportConfig()
    )
    assert again.parameters == manifest.parameters and again.created_at == manifest.created_at


def test_a_vllm_library_holds_no_variant_vllm_cannot_load(parent: dict[str, str]) -> None:
    lib, manifest = _build(parent, "vllm", ["vllm"])
    for layer in lib.layers:
        assert lib.variants(layer) == [
            "attn_kv2",
            "attn_kv1",
            "attn_noop",
            "ffn_512",
            "ffn_256",
            "ffn_noop",
        ]
        for name in lib.variants(layer):
            sub = BlockConfig.from_name(
                f"{name}+ffn_noop" if name.startswith("attn_") else f"attn_noop+{name}"
            )
            assert serving.block_reasons("vllm", sub) == []
    assert manifest.parameters["serve_with"] == ["vllm"]
    assert manifest.summary["left_out"] == ["attn_linear", "ffn_384", "ffn_linear"]
    assert lib.meta["serving"]["left_out"]["attn_linear"] == [
        "vLLM (nemotron_nas) cannot load a linear attention (replace_with_linear is not read)"
    ]
    meta = json.loads((Path(parent["root"]) / "vllm" / "library.json").read_text())
    assert meta["serving"]["serve_with"] == ["vllm"]


def test_llama_cpp_keeps_linear_attention_and_drops_the_linear_ffn(parent: dict[str, str]) -> None:
    lib, manifest = _build(parent, "llama-cpp", ["llama.cpp"])
    assert lib.variants(0) == [
        "attn_kv2",
        "attn_kv1",
        "attn_linear",
        "attn_noop",
        "ffn_512",
        "ffn_256",
        "ffn_noop",
    ]
    assert manifest.summary["left_out"] == ["ffn_384", "ffn_linear"]
    assert lib.meta["serving"]["left_out"]["ffn_384"] == [
        "llama.cpp (DECI) cannot load an FFN width that ffn_mult cannot express (not a multiple of 256)"
    ]


def test_odd_ffn_widths_are_left_out_for_every_engine_and_the_rules_combine(parent: dict[str, str]) -> None:
    from puzzle.library.variants import plan_layers
    from puzzle.modeling.layers import model_config

    config = model_config(parent["parent"])
    odd_space = replace(SPACE, ffn_fractions=[1.0, 0.25], ffn_multiple=64)  # 512 and 128 (not x256)
    plan = plan_layers(config, odd_space, None)
    assert "ffn_128" in plan[0]
    kept, left_out = restrict_to_engines(config, plan, ["llama.cpp", "trtllm"])
    assert kept[0] == ["attn_kv2", "attn_kv1", "attn_linear", "attn_noop", "ffn_512", "ffn_noop"]
    assert left_out["ffn_128"] == [
        f"{engine} cannot load an FFN width that ffn_mult cannot express (not a multiple of 256)"
        for engine in ("llama.cpp (DECI)", "TensorRT-LLM (NemotronNASForCausalLM)")
    ]
    assert set(left_out) == {"ffn_128", "ffn_linear"}
    assert restrict_to_engines(config, plan, []) == (plan, {})


@pytest.mark.parametrize(
    ("family", "overrides", "engine", "why"),
    [
        ("qwen3", {}, "vllm", r"q/k RMSNorm \(Qwen3\) is not read"),
        ("qwen2", {}, "trtllm", "attention/MLP biases are not read"),
        ("mistral", {"sliding_window": 4}, "mlx", r"sliding window 4 \(Mistral\) is not read"),
        (
            "llama",
            {"intermediate_size": 192},
            "llama.cpp",
            r"layers 0, 1, 2 use FFN widths that ffn_mult cannot",
        ),
    ],
)
def test_a_parent_a_named_engine_cannot_serve_fails_before_any_work(
    family: str, overrides: dict, engine: str, why: str, tiny_parent_factory, tmp_path: Path
) -> None:
    from puzzle.parent import convert

    convert(str(tiny_parent_factory(family, **overrides)), str(tmp_path / "parent"))
    # Raised before the tokens are read (they do not even exist) or anything is written.
    with pytest.raises(
        LibraryError, match=rf"export\.serve_with names '{re.escape(engine)}'.*{why}.*remove"
    ) as info:
        build_library(
            str(tmp_path / "parent"),
            "/nonexistent/tokens",
            str(tmp_path / "lib"),
            SPACE,
            export=ExportConfig(serve_with=[engine]),
        )
    assert "export.serve_with" in str(info.value) and not (tmp_path / "lib").exists()


def test_an_engine_that_reads_the_parents_features_is_accepted(tiny_parent_factory, tmp_path: Path) -> None:
    """vLLM reads Qwen2's q/k/v biases: the library is planned (it fails only on the missing tokens)."""
    from puzzle.parent import convert

    convert(str(tiny_parent_factory("qwen2")), str(tmp_path / "parent"))
    with pytest.raises(Exception, match="nonexistent") as info:
        build_library(
            str(tmp_path / "parent"),
            str(tmp_path / "nonexistent"),
            str(tmp_path / "lib"),
            SPACE,
            export=ExportConfig(serve_with=["vllm"]),
        )
    assert not isinstance(info.value, LibraryError)
