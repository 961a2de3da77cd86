"""The library component, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_library_follows_the_library_section(local_pipeline_run) -> None:
    run = local_pipeline_run
    meta = json.loads((run.artifact("library", "library") / "library.json").read_text())
    # Tiny parent: 4 heads / 2 KV heads, FFN width 192; kv_heads [1], fractions [1.0, 0.5], no linear FFN.
    assert set(meta["layers"]["0"]["variants"]) == {
        "attn_kv2",
        "attn_kv1",
        "attn_linear",
        "attn_noop",
        "ffn_192",
        "ffn_96",
        "ffn_noop",
    }
    assert run.metadata("library", "library")["kind"] == "library"
