"""What a run leaves on disk (issue 16, item 13): the library without the parent's own sub-blocks,
weights written in 16 bits where that is lossless enough, no file stored twice, and the children a
phase writes on its way to its output (the search's candidates, a baseline's realized child) removed
once the output is published, with resume intact."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from corpus import STDLIB_TEXT  # noqa: E402
from safetensors import safe_open

from puzzle.config import ConfigError, DataConfig, GKDConfig, LibraryConfig, ScoringConfig, SearchConfig
from puzzle.io import artifacts
from puzzle.modeling.checkpoints import load_model, read_parent_info, save_model

CANDIDATES = [
    ["attn_kv1+ffn_128", "attn_kv2+ffn_256", "attn_noop+ffn_256"],
    ["attn_kv2+ffn_128", "attn_kv1+ffn_256", "attn_kv2+ffn_noop"],
    ["attn_kv1+ffn_256", "attn_kv2+ffn_128", "attn_kv2+ffn_256"],
]
SCORING = ScoringConfig(split="score", batch_size=4)


def _dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as fh:
        return {fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())  # noqa: SIM118


@pytest.fixture(scope="module")
def pieces(tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny parent, its tokens, a library (the defaults: float16, the parent's own sub-blocks not
    stored) and a search's three candidates."""
    from puzzle.data import prepare
    from puzzle.library.variants import build_library

    root = tmp_path_factory.mktemp("footprint")
    text = root / "text.txt"
    text.write_text(STDLIB_TEXT * 3)
    tokens = root / "tokens"
    splits = {"calibration": 8, "bld": 1, "score": 4, "gkd": 8, "eval": 1}
    prepare(str(tiny_parent), str(tokens), DataConfig(source=str(text), seq_len=32, splits=splits))
    build_library(str(tiny_parent), str(tokens), str(root / "library"), LibraryConfig(ffn_multiple=64))

    def body(staging: Path, _local: dict) -> dict:
        solutions = [
            {"blocks": blocks, "objective": 0.1 * i, "relative_to_parent": {"throughput": 1.5}}
            for i, blocks in enumerate(CANDIDATES)
        ]
        (staging / "solutions.json").write_text(json.dumps({"solutions": solutions}))
        return {}

    artifacts.run_phase("solutions", str(root / "solutions"), {}, {"n": 3}, body)
    return {
        "root": str(root),
        "parent": str(tiny_parent),
        "tokens": str(tokens),
        "library": str(root / "library"),
        "solutions": str(root / "solutions"),
    }


def test_the_library_stores_no_copy_of_the_parents_own_sub_blocks_and_writes_float16(pieces) -> None:
    from puzzle.library.variants import Library, block_state

    lib = Library.open(pieces["library"])
    parent = load_model(pieces["parent"], dtype=torch.float32)
    for layer in lib.layers:
        stored = {
            k.split("/", 1)[0]
            for k in _keys(Path(pieces["library"]) / "layers" / f"layer_{layer:03d}.safetensors")
        }
        assert stored == {"attn_kv1", "ffn_128"}, stored  # not attn_kv2 / ffn_256 (the parent's), no no-op
        assert lib.parent_weights(layer, "attn_kv2") and lib.parent_weights(layer, "ffn_256")
        assert _dtypes(Path(pieces["library"]) / "layers" / f"layer_{layer:03d}.safetensors") == {
            torch.float16
        }
    assert lib.meta["format_version"] == 2
    # What a reader gets: float32, the parent's own sub-blocks from the parent's layer itself.
    layer_state = parent.model.layers[0].state_dict()
    state = block_state(lib, 0, torch_block("attn_kv2+ffn_128"), layer_state)
    assert state["self_attn.q_proj.weight"] is layer_state["self_attn.q_proj.weight"]
    assert state["mlp.up_proj.weight"].dtype == torch.float32
    with pytest.raises(Exception, match="the parent's own sub-block"):
        block_state(lib, 0, torch_block("attn_kv2+ffn_128"), None)
    # A float32 library holds the same variants, twice the bytes.
    wide = str(Path(pieces["root"]) / "library-f32")
    from puzzle.library.variants import build_library

    build_library(
        pieces["parent"], pieces["tokens"], wide, LibraryConfig(ffn_multiple=64, save_dtype="float32")
    )
    narrow, full = artifacts.read_manifest(pieces["library"]), artifacts.read_manifest(wide)
    assert narrow is not None and full is not None
    layer_bytes = [
        sum(m.files[f]["size"] for f in m.files if f.startswith("layers/")) for m in (narrow, full)
    ]
    assert layer_bytes[0] < 0.51 * layer_bytes[1]
    for key, value in Library.open(wide).load(1, "ffn_128").items():
        assert torch.equal(lib.load(1, "ffn_128")[key], value.half().float())


def torch_block(name: str):
    from puzzle.modeling import BlockConfig

    return BlockConfig.from_name(name)


def test_save_model_writes_float16_keeps_ties_and_falls_back_to_float32_beyond_its_range(
    tiny_parent_factory, tmp_path: Path, caplog
) -> None:
    from puzzle.parent import convert

    convert(str(tiny_parent_factory("qwen2")), str(tmp_path / "parent"))  # tied embeddings
    model = load_model(str(tmp_path / "parent"), dtype=torch.float32)
    assert model.config.tie_word_embeddings
    save_model(model, None, tmp_path / "half", {}, dtype="float16")
    weights = tmp_path / "half" / "model.safetensors"
    assert _dtypes(weights) == {torch.float16}
    assert "lm_head.weight" not in _keys(weights)  # still tied: one copy of the embeddings
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float16"
    assert next(model.parameters()).dtype == torch.float32  # the model saved is left as it was
    half = load_model(tmp_path / "half", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        assert torch.allclose(half(ids).logits, model(ids).logits, atol=5e-3)
    assert half.lm_head.weight.data_ptr() == half.model.embed_tokens.weight.data_ptr()
    # A value float16 cannot hold: the whole model is written in float32, with a warning.
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    with caplog.at_level(logging.WARNING, logger="puzzle.modeling.checkpoints"):
        save_model(model, None, tmp_path / "big", {}, dtype="float16")
    assert _dtypes(tmp_path / "big" / "model.safetensors") == {torch.float32}
    assert "beyond float16's range" in caplog.text


def test_an_output_file_identical_to_an_inputs_is_a_hard_link_not_a_copy(tmp_path: Path) -> None:
    def source(staging: Path, _local: dict) -> dict:
        (staging / "weights.bin").write_bytes(b"w" * 4096)
        return {}

    artifacts.run_phase("thing", str(tmp_path / "a"), {}, {}, source)

    def derived(staging: Path, local: dict) -> dict:
        (staging / "weights.bin").write_bytes((local["a"] / "weights.bin").read_bytes())  # the same bytes
        (staging / "other.bin").write_bytes(b"x" * 4096)
        return {}

    manifest = artifacts.run_phase("thing", str(tmp_path / "b"), {"a": str(tmp_path / "a")}, {}, derived)
    assert os.path.samefile(tmp_path / "a" / "weights.bin", tmp_path / "b" / "weights.bin")
    assert (tmp_path / "b" / "other.bin").stat().st_nlink == 1
    artifacts.materialize(str(tmp_path / "b"))  # still verifies

    # Both stay what their manifests say when one is rebuilt (a new directory, never in place).
    def changed(staging: Path, _local: dict) -> dict:
        (staging / "weights.bin").write_bytes(b"v" * 4096)
        return {}

    artifacts.run_phase("thing", str(tmp_path / "a"), {}, {"again": 1}, changed)
    assert (tmp_path / "a" / "weights.bin").read_bytes() == b"v" * 4096
    assert artifacts.is_current(str(tmp_path / "b"), "thing", {"a": str(tmp_path / "a")}, {}) is None
    artifacts.verify_local(tmp_path / "b", manifest, "b")


def _realize(pieces: dict[str, str], out: str, gkd: GKDConfig | None = None) -> artifacts.Manifest:
    from puzzle.child.realize import realize_candidates

    return realize_candidates(
        pieces["library"],
        pieces["solutions"],
        pieces["parent"],
        pieces["tokens"],
        out,
        scoring=SCORING,
        search=SearchConfig(),
        gkd=gkd or GKDConfig(),
        device="cpu",
    )


def test_candidates_are_working_files_removed_once_the_child_is_published_and_it_resumes(
    pieces, monkeypatch
) -> None:
    from puzzle.child import realize as realize_module

    root = Path(pieces["root"])
    out = root / "child"
    measured = realize_module._candidate_quality

    def killed(*args, **kwargs):
        raise RuntimeError("killed while measuring the candidates")

    monkeypatch.setattr(realize_module, "_candidate_quality", killed)
    with pytest.raises(RuntimeError, match="killed"):
        _realize(pieces, str(out))
    steps = Path(f"{out}.partial") / ".work" / "steps"
    assert sorted(p.name for p in steps.iterdir() if p.is_dir()) == [f"candidate-{i}" for i in (1, 2, 3)]
    assert not out.exists()

    # Resumed: the candidates already written are not written again.
    monkeypatch.setattr(realize_module, "_candidate_quality", measured)
    saved: list[Path] = []
    monkeypatch.setattr(realize_module, "save_model", lambda *a, **k: saved.append(a[2]))
    manifest = _realize(pieces, str(out))
    assert saved == []
    assert not Path(f"{out}.partial").exists() and not (root / "child-steps").exists()
    ranking = read_parent_info(out)["realized_from"]["candidates"]
    assert [c["rank"] for c in ranking] == [1, 2, 3] and sum(c["chosen"] for c in ranking) == 1
    chosen = next(c for c in ranking if c["chosen"])
    assert chosen["kl_div"] == min(c["kl_div"] for c in ranking)
    assert [b.name for b in load_model(out).config.blocks] == chosen["blocks"]
    assert _dtypes(out / "model.safetensors") == {torch.float16}  # gkd.save_dtype
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"

    # Up to date the next time, though the candidates are gone.
    again = _realize(pieces, str(out))
    assert again.created_at == manifest.created_at and saved == []
    # Another child dtype is another child.
    monkeypatch.setattr(realize_module, "save_model", save_model)
    wide = _realize(pieces, str(out), GKDConfig(save_dtype="float32"))
    assert wide.created_at != manifest.created_at and _dtypes(out / "model.safetensors") == {torch.float32}


def test_gkd_keep_steps_keeps_the_candidates_and_the_child_shares_the_chosen_ones_files(pieces) -> None:
    root = Path(pieces["root"])
    out = root / "kept"
    _realize(pieces, str(out), GKDConfig(keep_steps=True))
    chosen = read_parent_info(out)["realized_from"]["chosen"]
    for i in (1, 2, 3):
        assert artifacts.read_manifest(str(root / "kept-steps" / f"candidate-{i}")) is not None
    candidate = root / "kept-steps" / f"candidate-{chosen}"
    assert os.path.samefile(candidate / "model.safetensors", out / "model.safetensors")
    # The child's parent.json (with the ranking) is its own; the candidate's is as it was written.
    assert not os.path.samefile(candidate / "parent.json", out / "parent.json")
    artifacts.materialize(str(candidate))
    assert "candidates" not in read_parent_info(candidate)["realized_from"]


def test_parent_dtype_auto_is_the_originals_own(tiny_parent_factory, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from puzzle.parent import ParentSource, convert, source_dtype

    original = tiny_parent_factory("llama", seed=3)
    halved = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(original, dtype=torch.bfloat16).save_pretrained(halved)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (original / name).exists():
            (halved / name).write_bytes((original / name).read_bytes())
    manifest = convert(str(halved), str(tmp_path / "parent"))
    assert manifest.summary["dtype"] == "bfloat16" and manifest.parameters["dtype"] == "auto"
    weights = tmp_path / "parent" / "model.safetensors"
    assert _dtypes(weights) == {torch.bfloat16}
    # Lossless: the very bits of the original.
    source = AutoModelForCausalLM.from_pretrained(halved, dtype=torch.bfloat16).state_dict()
    with safe_open(str(weights), framework="pt") as fh:
        assert torch.equal(
            fh.get_tensor("model.layers.0.mlp.up_proj.weight"), source["model.layers.0.mlp.up_proj.weight"]
        )
    # A float32 original stays float32 (the tiny parents of the other tests); a GGUF file, whose
    # weights are quantized, is written in float16.
    assert convert(str(original), str(tmp_path / "f32")).summary["dtype"] == "float32"
    gguf = ParentSource(kind="gguf", reference="x.gguf", path=tmp_path, gguf_file="x.gguf")
    assert source_dtype(gguf, None) == "float16"


@pytest.mark.parametrize("section", ["library", "gkd"])
def test_save_dtype_is_checked(section: str) -> None:
    cls = LibraryConfig if section == "library" else GKDConfig
    with pytest.raises(
        ConfigError, match=rf"{section}\.save_dtype must be one of float16, bfloat16, float32"
    ):
        cls(save_dtype="int8")  # type: ignore[arg-type]
