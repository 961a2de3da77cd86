"""The library component builds every variant of every layer from the library section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import dsl

from components.conftest import TINY_LIBRARY
from components.library.component import library as library_component


def test_library_holds_the_requested_variants(tiny_parent: Path, tiny_tokens: Path, tmp_path: Path) -> None:
    library = dsl.Model(name="library", uri=str(tmp_path / "library"), metadata={})
    parent = dsl.Model(name="parent", uri=str(tiny_parent), metadata={})
    tokens = dsl.Dataset(name="tokens", uri=str(tiny_tokens), metadata={})
    # List parameters arrive as JSON: numbers may be floats.
    config = {**TINY_LIBRARY, "kv_heads": [1.0], "attention_linear": False, "batch_size": 4}

    library_component.python_func(parent=parent, tokens=tokens, library=library, library_config=config)

    meta = json.loads((tmp_path / "library" / "library.json").read_text())
    assert set(meta["layers"]) == {"0", "1", "2"}
    for layer in meta["layers"].values():
        assert set(layer["variants"]) == {"attn_kv2", "attn_kv1", "attn_noop", "ffn_256", "ffn_noop"}
    assert library.metadata["kind"] == "library"
    assert library.metadata["variants"] == 15


def test_library_rejects_kv_heads_that_do_not_divide(
    tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    from puzzle.errors import PuzzleError

    library = dsl.Model(name="library", uri=str(tmp_path / "library"), metadata={})
    parent = dsl.Model(name="parent", uri=str(tiny_parent), metadata={})
    tokens = dsl.Dataset(name="tokens", uri=str(tiny_tokens), metadata={})
    with pytest.raises(PuzzleError, match="kv_heads"):
        library_component.python_func(
            parent=parent, tokens=tokens, library=library, library_config={**TINY_LIBRARY, "kv_heads": [3]}
        )
    assert not (tmp_path / "library").exists()


def test_library_leaves_out_what_the_export_sections_engines_cannot_load(
    tiny_parent: Path, tiny_tokens: Path, tmp_path: Path
) -> None:
    library = dsl.Model(name="library", uri=str(tmp_path / "library"), metadata={})
    parent = dsl.Model(name="parent", uri=str(tiny_parent), metadata={})
    tokens = dsl.Dataset(name="tokens", uri=str(tiny_tokens), metadata={})
    config = {**TINY_LIBRARY, "batch_size": 4}  # attention_linear: true

    library_component.python_func(
        parent=parent,
        tokens=tokens,
        library=library,
        library_config=config,
        export_config={"serve_with": ["vllm"]},
    )

    meta = json.loads((tmp_path / "library" / "library.json").read_text())
    for layer in meta["layers"].values():
        assert set(layer["variants"]) == {"attn_kv2", "attn_kv1", "attn_noop", "ffn_256", "ffn_noop"}
    assert list(meta["serving"]["left_out"]) == ["attn_linear"]
