"""The BLD merge component, run by KFP's local runner on the collected shards of the pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_bld_merge_collects_every_shard(local_pipeline_run) -> None:
    run = local_pipeline_run
    meta = json.loads((run.artifact("bld-merge", "trained") / "library.json").read_text())
    assert meta.get("partial") is False
    trained = [name for e in meta["layers"].values() for name, v in e["variants"].items() if v.get("trained")]
    # Per layer: attn_kv1, attn_linear, ffn_96 are trainable (parent and no-op variants are not).
    assert len(trained) == 3 * 3
    assert run.metadata("bld-merge", "trained")["merged_shards"] == 2
