"""Realize: the child of one solution, assembled from the library."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from corpus import STDLIB_TEXT  # noqa: E402

from puzzle.child.realize import RealizeError, realize
from puzzle.config import DataConfig
from puzzle.io import artifacts
from puzzle.modeling import BlockConfig
from puzzle.modeling.checkpoints import load_model

ROOT = Path(__file__).resolve().parents[1]
CHOICES = [
    ["attn_kv1+ffn_128", "attn_noop+ffn_256", "attn_linear+ffn_noop"],
    ["attn_kv2+ffn_256", "attn_kv2+ffn_256", "attn_kv2+ffn_256"],
]


def write_solutions(out: Path, solutions: list[dict]) -> str:
    def body(staging: Path, _local: dict) -> dict:
        (staging / "solutions.json").write_text(json.dumps({"solutions": solutions}))
        return {}

    artifacts.run_phase("solutions", str(out), {}, {"n": len(solutions), "s": solutions}, body)
    return str(out)


@pytest.fixture(scope="module")
def library(tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from puzzle.data import prepare
    from puzzle.library.variants import PAPER_LIBRARY, build_library

    root = tmp_path_factory.mktemp("realize")
    text = root / "text.txt"
    text.write_text(STDLIB_TEXT * 3)
    tokens = root / "tokens"
    prepare(
        str(tiny_parent),
        str(tokens),
        DataConfig(
            source=str(text), seq_len=32, splits={"calibration": 8, "bld": 1, "score": 1, "gkd": 1, "eval": 1}
        ),
    )
    out = root / "library"
    space = dataclasses.replace(
        PAPER_LIBRARY, kv_heads=[1], ffn_fractions=[0.5], ffn_linear=False, ffn_multiple=64
    )
    build_library(str(tiny_parent), str(tokens), str(out), space)
    return str(out)


def test_realized_child_has_the_solutions_blocks_and_the_librarys_weights(
    tiny_parent: Path, library: str, tmp_path
) -> None:
    from puzzle.library.variants import Library

    solutions = write_solutions(
        tmp_path / "solutions",
        [{"blocks": CHOICES[0], "objective": 0.1}, {"choices": CHOICES[1], "objective": 0.2}],
    )
    manifest = realize(library, solutions, str(tiny_parent), str(tmp_path / "child"))
    child = load_model(str(tmp_path / "child"))
    assert [b.name for b in child.config.blocks] == CHOICES[0]
    assert manifest.summary["blocks"] == CHOICES[0] and manifest.summary["solution"] == {"objective": 0.1}
    lib, parent = Library.open(library), load_model(str(tiny_parent))
    state = child.state_dict()
    narrow = lib.load(0, "ffn_128")
    for key, value in narrow.items():
        assert torch.equal(state[f"model.layers.0.{key}"], value)
    assert torch.equal(
        state["model.layers.2.self_attn.linear_attn.weight"],
        lib.load(2, "attn_linear")["self_attn.linear_attn.weight"],
    )
    assert child.model.layers[1].self_attn is None and child.model.layers[2].mlp is None
    assert torch.equal(state["model.embed_tokens.weight"], parent.state_dict()["model.embed_tokens.weight"])
    assert child.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=3, do_sample=False).shape == (1, 6)

    # Another solution index (stored under "choices") gives the other architecture.
    realize(library, solutions, str(tiny_parent), str(tmp_path / "child1"), solution_index=1)
    assert [b.name for b in load_model(str(tmp_path / "child1")).config.blocks] == CHOICES[1]


def test_bad_solutions_fail_before_any_weights_are_loaded(tiny_parent: Path, library: str, tmp_path) -> None:
    empty = write_solutions(tmp_path / "empty", [])
    with pytest.raises(RealizeError, match="holds no solution"):
        realize(library, empty, str(tiny_parent), str(tmp_path / "a"))
    one = write_solutions(tmp_path / "one", [{"blocks": CHOICES[0]}])
    with pytest.raises(
        RealizeError, match=r"solution_index=3 is out of range: .* holds 1 solution\(s\) \(use 0..0\)"
    ):
        realize(library, one, str(tiny_parent), str(tmp_path / "a"), solution_index=3)
    broken = write_solutions(tmp_path / "broken", [{"objective": 1.0}])
    with pytest.raises(RealizeError, match="has no blocks / choices / architecture list"):
        realize(library, broken, str(tiny_parent), str(tmp_path / "a"))
    with pytest.raises(artifacts.ArtifactError, match="no library artifact"):
        realize(str(tmp_path / "nothing"), one, str(tiny_parent), str(tmp_path / "a"))
    assert not (tmp_path / "a").exists()


def test_a_variant_missing_from_the_library_is_named(tiny_parent: Path, library: str, tmp_path) -> None:
    from puzzle.library.variants import LibraryError

    missing = write_solutions(tmp_path / "m", [{"blocks": ["attn_kv2+ffn_64", *CHOICES[0][1:]]}])
    with pytest.raises(LibraryError, match="layer 0: variant ffn_64 is not in library"):
        realize(library, missing, str(tiny_parent), str(tmp_path / "a"))
    assert BlockConfig.from_name("attn_kv2+ffn_64").ffn.intermediate_size == 64
