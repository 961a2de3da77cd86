"""Replace-1-block scoring: rows for every (layer, variant), parent = 0, shards, modes, errors."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest

from puzzle.config import BLDConfig, ConfigError, DataConfig, ScoringConfig
from puzzle.data import prepare
from puzzle.library import scoring
from puzzle.library.scoring import ScoringError, merge, read_scores, score
from puzzle.library.variants import PAPER_LIBRARY, Library, LibraryError, build_library

# Every metric (the config names top1/top5 by their long names).
ALL_METRICS = ["kl_div", "lm_loss", "cosine", "top1_agreement", "top5_agreement"]
SCORING = ScoringConfig(metrics=ALL_METRICS, batch_size=4)


@pytest.fixture(scope="module")
def tiny(tiny_parent_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny parent (FFN 192), its tokens, a library (attention kv2/kv1/linear/noop, FFN 192/96/linear/noop)
    and its decoupled scores."""
    from puzzle.parent import convert

    root = tmp_path_factory.mktemp("score-tiny")
    convert(str(tiny_parent_factory("llama", intermediate_size=192)), str(root / "parent"))
    prepare(
        str(root / "parent"),
        str(root / "tokens"),
        DataConfig(seq_len=32, splits={"calibration": 8, "score": 6}),
    )
    build_library(
        str(root / "parent"),
        str(root / "tokens"),
        str(root / "lib"),
        replace(PAPER_LIBRARY, ffn_fractions=[1.0, 0.5]),
    )
    paths = {name: str(root / name) for name in ("parent", "tokens", "lib", "scores")}
    score(paths["lib"], paths["parent"], paths["tokens"], paths["scores"], SCORING)
    paths["root"] = str(root)
    return paths


def test_every_layer_and_variant_scored_parent_zero_noop_positive(tiny: dict[str, str]) -> None:
    lib = Library.open(tiny["lib"])
    rows = read_scores(tiny["scores"])["rows"]
    # Decoupled: the parent block once, every other attention variant with the parent FFN and
    # every other FFN variant with the parent attention: 1 + 3 + 3 rows in each of 3 layers.
    expected = set()
    for layer in lib.layers:
        expected |= {(layer, f"{a}+ffn_192") for a in lib.attention_variants(layer)}
        expected |= {(layer, f"attn_kv2+{f}") for f in lib.ffn_variants(layer)}
    assert {(r["layer"], r["block"]) for r in rows} == expected and len(rows) == 3 * 7
    for row in rows:
        assert row["num_tokens"] == 6 * 31
        assert all(row[m] is not None for m in scoring.METRICS)
        if row["block"] == "attn_kv2+ffn_192":  # the parent's own block
            assert row["kl_div"] == pytest.approx(0.0, abs=1e-6)
            assert row["top1"] == 1.0 and row["top5"] == 1.0 and row["cosine"] == pytest.approx(1.0, abs=1e-5)
        elif "noop" in row["block"]:
            assert row["kl_div"] > 1e-5 and row["cosine"] < 1.0
        assert row["top1_agreement"] == row["top1"]
    local = Path(tiny["scores"])
    with (local / "scores.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == list(scoring.COLUMNS) and len(table) == len(rows)
    assert (local / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_mode_scores_every_pair_consistently_with_decoupled(tiny: dict[str, str]) -> None:
    out = str(Path(tiny["root"]) / "full")
    score(tiny["lib"], tiny["parent"], tiny["tokens"], out, replace(SCORING, mode="full"), layers=[1])
    full = {r["block"]: r for r in read_scores(out)["rows"]}
    assert len(full) == 4 * 4  # every attention x FFN pair of layer 1
    for row in read_scores(tiny["scores"])["rows"]:
        if row["layer"] == 1:
            assert full[row["block"]]["kl_div"] == pytest.approx(row["kl_div"], rel=1e-6, abs=1e-9)


def test_sharded_scoring_merges_into_the_unsharded_table(tiny: dict[str, str]) -> None:
    root = Path(tiny["root"])
    shards = [str(root / f"shard-{i}") for i in range(3)]
    for i, out in enumerate(shards):
        score(tiny["lib"], tiny["parent"], tiny["tokens"], out, SCORING, shard=f"{i}/3")
    assert sum(len(read_scores(s)["rows"]) for s in shards) == 21
    with pytest.raises(ScoringError, match="not every shard"):
        merge(shards[:2], str(root / "part"))
    merge(list(reversed(shards)), str(root / "merged"))
    assert read_scores(str(root / "merged"))["rows"] == read_scores(tiny["scores"])["rows"]


def test_metric_selection_and_aliases(tiny: dict[str, str]) -> None:
    out = str(Path(tiny["root"]) / "some-metrics")
    score(
        tiny["lib"],
        tiny["parent"],
        tiny["tokens"],
        out,
        ScoringConfig(metrics=["kl_div", "top1_agreement"]),
        layers=[2],
    )
    rows = read_scores(out)["rows"]
    assert all(r["top1"] == r["top1_agreement"] is not None and r["lm_loss"] is None for r in rows)
    # The settings section validates itself: an unknown metric fails before score() is even called.
    with pytest.raises(ConfigError, match=r"scoring\.metrics\[0\] must be one of .*got 'accuracy'"):
        score(tiny["lib"], tiny["parent"], tiny["tokens"], out, ScoringConfig(metrics=["accuracy"]))


def test_scoring_errors(tiny: dict[str, str], tiny_parent_factory, tmp_path: Path) -> None:
    from puzzle.library.bld import train
    from puzzle.parent import convert

    scoring_config = ScoringConfig(metrics=ALL_METRICS)
    with pytest.raises(ScoringError, match="no 'eval' split"):
        score(
            tiny["lib"],
            tiny["parent"],
            tiny["tokens"],
            str(tmp_path / "x"),
            replace(scoring_config, split="eval"),
        )
    with pytest.raises(ScoringError, match=r"layers \[5\] are not in library"):
        score(tiny["lib"], tiny["parent"], tiny["tokens"], str(tmp_path / "x"), scoring_config, layers=[5])
    with pytest.raises(ScoringError, match="mode must be one of"):
        scoring.plan_rows(Library.open(tiny["lib"]), mode="pairs")
    convert(str(tiny_parent_factory("llama", hidden_size=32, intermediate_size=192)), str(tmp_path / "other"))
    with pytest.raises(LibraryError, match="hidden_size is 64 in the library but 32 in the parent"):
        score(tiny["lib"], str(tmp_path / "other"), tiny["tokens"], str(tmp_path / "x"), scoring_config)
    train(
        tiny["lib"],
        tiny["parent"],
        tiny["tokens"],
        str(tmp_path / "shard"),
        BLDConfig(token_budget=32, batch_size=1, lr=1e-3, val_sequences=1),
        shard="0/4",
        val_split="calibration",
        split="score",
    )
    with pytest.raises(LibraryError, match="merge the shards first"):
        score(str(tmp_path / "shard"), tiny["parent"], tiny["tokens"], str(tmp_path / "x"), scoring_config)
    assert not (tmp_path / "x").exists()


def test_cli_scores_and_merges(tiny: dict[str, str], tmp_path: Path) -> None:
    from puzzle.cli import main

    common = [
        tiny["lib"],
        tiny["parent"],
        tiny["tokens"],
        "--set",
        "scoring.batch_size=4",
        "--set",
        f"scoring.metrics=[{', '.join(ALL_METRICS)}]",
    ]
    for i in range(2):
        assert main(["scoring", *common, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"]) == 0
    assert (
        main(["scoring", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")])
        == 0
    )
    assert read_scores(str(tmp_path / "m"))["rows"] == read_scores(tiny["scores"])["rows"]


@pytest.mark.integration
def test_smollm2_scores_parent_zero_and_noop_positive(
    smollm2_parent: Path, smollm2_tokens: Path, tmp_path: Path
) -> None:
    """The real parent's last layer with the paper's search space, on 4 held-out sequences."""
    build_library(
        str(smollm2_parent),
        str(smollm2_tokens),
        str(tmp_path / "lib"),
        PAPER_LIBRARY,
        layers=[29],
        calibration_sequences=4,
    )
    score(
        str(tmp_path / "lib"),
        str(smollm2_parent),
        str(smollm2_tokens),
        str(tmp_path / "scores"),
        ScoringConfig(metrics=ALL_METRICS),
        max_sequences=4,
    )
    rows = {r["block"]: r for r in read_scores(str(tmp_path / "scores"))["rows"]}
    attention = ["attn_kv3", "attn_kv1", "attn_linear", "attn_noop"]
    ffn = ["ffn_1536", "ffn_1280", "ffn_768", "ffn_512", "ffn_256", "ffn_linear", "ffn_noop"]
    assert set(rows) == {f"{a}+ffn_1536" for a in attention} | {f"attn_kv3+{f}" for f in ffn}
    assert rows["attn_kv3+ffn_1536"]["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert rows["attn_noop+ffn_1536"]["kl_div"] > 1e-3 and rows["attn_kv3+ffn_noop"]["kl_div"] > 1e-3
    # Narrower FFNs lose more: the KL grows as the width shrinks.
    widths = [rows[f"attn_kv3+ffn_{w}"]["kl_div"] for w in (1280, 768, 512, 256)]
    assert widths == sorted(widths), widths
