"""Token data: sources (stdlib, text, JSONL, directories, S3), packing, deterministic disjoint splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from puzzle.config import ConfigError, DataConfig
from puzzle.data import DataError, load_split, prepare, read_splits


@pytest.fixture(scope="module")
def numbered_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text file whose 32-token sequences are all different (every line carries its number)."""
    path = tmp_path_factory.mktemp("text") / "numbered.txt"
    path.write_text("".join(f"line {i} of a numbered text\n" for i in range(600)))
    return path


def _rows(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r.tolist()) for r in t}


def test_splits_are_disjoint_deterministic_and_seeded(
    tiny_parent: Path, numbered_text: Path, tmp_path: Path
) -> None:
    splits = {"calibration": 8, "bld": 40, "score": 8, "eval": 8}
    prepare(
        str(tiny_parent),
        str(tmp_path / "a"),
        DataConfig(source=str(numbered_text), seq_len=32, splits=splits, seed=1),
    )
    prepare(
        str(tiny_parent),
        str(tmp_path / "b"),
        DataConfig(source=str(numbered_text), seq_len=32, splits=splits, seed=1),
    )
    prepare(
        str(tiny_parent),
        str(tmp_path / "c"),
        DataConfig(source=str(numbered_text), seq_len=32, splits=splits, seed=2),
    )
    parts = {name: load_split(str(tmp_path / "a"), name) for name in splits}
    for name, count in splits.items():
        assert parts[name].shape == (count, 32) and parts[name].dtype == torch.int64
        assert torch.equal(parts[name], load_split(str(tmp_path / "b"), name))
    all_rows = [r for p in parts.values() for r in _rows(p)]
    assert len(all_rows) == len(set(all_rows)) == sum(splits.values())  # no sequence in two splits
    assert not torch.equal(parts["bld"], load_split(str(tmp_path / "c"), "bld"))
    info = read_splits(str(tmp_path / "a"))
    assert info["seq_len"] == 32 and info["splits"]["bld"] == {
        "file": "bld.safetensors",
        "sequences": 40,
        "tokens": 1280,
    }
    # The token stream is the tokenizer's: decoding a sequence gives back the file's text.
    from puzzle.modeling.checkpoints import load_tokenizer

    text = load_tokenizer(str(tiny_parent)).decode(parts["eval"][0])
    assert "of a numbered text" in text and text in numbered_text.read_text() + numbered_text.read_text()


def test_stdlib_default_corpus(tiny_parent: Path, tmp_path: Path) -> None:
    prepare(
        str(tiny_parent), str(tmp_path / "t"), DataConfig(seq_len=64, splits={"calibration": 4, "score": 4})
    )
    info = read_splits(str(tmp_path / "t"))
    assert info["source"] == "stdlib" and info["python_version"] and info["documents_read"] >= 1
    ids = load_split(str(tmp_path / "t"), "score")
    assert ids.shape == (4, 64) and int(ids.max()) < info["vocab_size"]


def test_jsonl_and_directory_sources(tiny_parent: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with (corpus / "a.jsonl").open("w") as fh:
        for i in range(50):
            fh.write(json.dumps({"text": f"record {i}: a short JSONL document"}) + "\n")
    (corpus / "b.txt").write_text("plain text document " * 40)
    (corpus / "ignored.bin").write_bytes(b"\x00\x01")
    prepare(
        str(tiny_parent), str(tmp_path / "t"), DataConfig(source=str(corpus), seq_len=32, splits={"bld": 20})
    )
    assert load_split(str(tmp_path / "t"), "bld").shape == (20, 32)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="text_field"):
        prepare(
            str(tiny_parent), str(tmp_path / "u"), DataConfig(source=str(bad), seq_len=8, splits={"bld": 1})
        )


def test_too_little_data_and_bad_requests(tiny_parent: Path, numbered_text: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"only \d+ tokens .* the splits need 100000"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source=str(numbered_text), seq_len=32, splits={"bld": 100000}),
        )
    assert not (tmp_path / "x" / "manifest.json").exists()
    # Bad settings fail before any work, naming the field (the section validates itself).
    with pytest.raises(ConfigError, match=r"data\.seq_len must be >= 8"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source=str(numbered_text), seq_len=1, splits={"bld": 1}),
        )
    with pytest.raises(ConfigError, match=r"data\.splits\.bld must be > 0"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source=str(numbered_text), seq_len=8, splits={"bld": 0}),
        )
    with pytest.raises(DataError, match="split name"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source=str(numbered_text), seq_len=8, splits={"Bad Name": 1}),
        )
    with pytest.raises(DataError, match="does not exist"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source=str(tmp_path / "nope.txt"), seq_len=8, splits={"bld": 1}),
        )
    with pytest.raises(DataError, match="hf:NAME"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source="hf:only-name", seq_len=8, splits={"bld": 1}),
        )
    prepare(
        str(tiny_parent),
        str(tmp_path / "ok"),
        DataConfig(source=str(numbered_text), seq_len=8, splits={"bld": 2}),
    )
    with pytest.raises(DataError, match=r"no split 'score'.*`puzzle data` with a data\.splits\.score entry"):
        load_split(str(tmp_path / "ok"), "score")


def test_hf_source_without_datasets_is_a_clear_error(tiny_parent: Path, tmp_path: Path) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="datasets"):
            prepare(
                str(tiny_parent),
                str(tmp_path / "x"),
                DataConfig(source="hf:wikitext:wikitext-2-raw-v1:train", seq_len=8, splits={"bld": 1}),
            )
    else:
        pytest.skip("datasets is installed; the hub is unreachable here, so nothing to check offline")


@pytest.mark.integration
def test_s3_source_and_output(tiny_parent: Path, numbered_text: Path, s3_bucket: str, tmp_path: Path) -> None:
    from puzzle.io import storage

    storage.upload_file(numbered_text, f"s3://{s3_bucket}/corpus/numbered.txt")
    out = f"s3://{s3_bucket}/tokens"
    prepare(
        str(tiny_parent),
        out,
        DataConfig(source=f"s3://{s3_bucket}/corpus", seq_len=32, splits={"bld": 10, "score": 4}),
    )
    prepare(
        str(tiny_parent),
        str(tmp_path / "local"),
        DataConfig(source=str(numbered_text), seq_len=32, splits={"bld": 10, "score": 4}),
    )
    assert torch.equal(load_split(out, "bld"), load_split(str(tmp_path / "local"), "bld"))
