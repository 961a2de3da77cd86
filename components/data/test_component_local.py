"""The data component, run by KFP's local runner inside the whole pipeline."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_data_writes_the_configured_splits(local_pipeline_run) -> None:
    run = local_pipeline_run
    info = json.loads((run.artifact("data", "tokens") / "splits.json").read_text())
    expected = {
        name: run.arguments["data"]["splits"][name] for name in ("calibration", "bld", "score", "gkd", "eval")
    }
    if run.arguments["data"].get("ood_source"):  # the out-of-domain evaluation split
        expected["eval_ood"] = run.arguments["data"]["ood_sequences"]
    assert {name: s["sequences"] for name, s in info["splits"].items()} == expected
    assert info["seq_len"] == run.arguments["data"]["seq_len"]
