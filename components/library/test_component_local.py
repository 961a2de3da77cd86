"""The library component runs under KFP's local runner."""

import json
from pathlib import Path

from kfp import dsl

from components.conftest import TINY_SPACE
from components.library.component import build_library


def test_build_library_runs_locally(kfp_local: Path, tiny_child: Path, tiny_tokens: Path) -> None:
    @dsl.pipeline
    def library_only(child_uri: str, tokens_uri: str) -> dsl.Model:
        child = dsl.importer(artifact_uri=child_uri, artifact_class=dsl.Model)
        tokens = dsl.importer(artifact_uri=tokens_uri, artifact_class=dsl.Dataset)
        return build_library(child=child.output, tokens=tokens.output, batch_size=4, **TINY_SPACE).outputs["library"]

    run = library_only(child_uri=str(tiny_child), tokens_uri=str(tiny_tokens))

    meta = json.loads((Path(run.output.path) / "library.json").read_text())
    assert set(meta["layers"]["1"]["variants"]) == {"attn_kv2", "attn_kv1", "attn_linear", "attn_noop", "ffn_256", "ffn_noop"}
