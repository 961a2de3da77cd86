"""Token data: text sources packed into fixed-length sequences, split deterministically.

:func:`prepare` reads a text source, tokenizes it with the parent's tokenizer, packs the token
stream into sequences of ``seq_len`` tokens and carves them into named, disjoint splits
(standard names: ``calibration`` for the library's initialisation, ``bld`` for blockwise
distillation, ``score`` for replace-1-block scoring, ``gkd`` for global distillation, ``eval``
for the final evaluation). The result is a ``tokens`` artifact: one safetensors file per split
(``input_ids``, int32 ``[n, seq_len]``) and ``splits.json``. :func:`load_split` reads a split back.

Sources:

* ``stdlib`` - the embedded default: the Python standard library's sources (code, comments and
  docstrings), which exist offline on every machine. Test suites, ``site-packages`` and IDLE
  are left out.
* a local text file, JSONL file (one ``{"text": ...}`` object per line) or a directory of them;
* an ``s3://`` prefix (or object) holding such files;
* ``hf:NAME[:CONFIG]:SPLIT`` - a Hugging Face dataset (needs the ``datasets`` package and a
  reachable hub), e.g. ``hf:wikitext:wikitext-2-raw-v1:train``.

Determinism: documents are visited in sorted order shuffled with ``seed``; documents are joined
with the tokenizer's end-of-sequence token; the packed sequences are shuffled with ``seed`` and
carved into the splits in the order the ``splits`` mapping gives them. Only as many documents
are read as the splits need, so a small request on a large source is fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from puzzle.config import DataConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts, storage
from puzzle.io.artifacts import Manifest
from puzzle.modeling.checkpoints import MODEL_KINDS

log = logging.getLogger(__name__)

TOKENS_KIND = "tokens"
SPLITS_FILE = "splits.json"
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
_TOKENIZE_BATCH = 32


class DataError(PuzzleError, ValueError):
    """Bad data request (source, splits, sequence length) or too little text for it."""


def _validate(source: str, seq_len: int, splits: dict[str, int]) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not splits:
        raise DataError("splits must name at least one split, e.g. {'bld': 256, 'score': 16}")
    for name, count in splits.items():
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise DataError(f"split name {name!r} must be lower-case letters, digits and '_' (e.g. 'bld')")
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise DataError(f"splits[{name!r}] must be a number of sequences >= 1, got {count!r}")
    if not source:
        raise DataError("source must be 'stdlib', a local path, an s3:// URI or hf:NAME[:CONFIG]:SPLIT")
    if source.startswith("hf:"):
        _parse_hf(source)
    elif source != "stdlib" and not storage.is_s3(source) and not Path(source).exists():
        raise DataError(
            f"source {source!r} does not exist: pass 'stdlib', a local text/JSONL file or directory, "
            "an s3:// prefix or hf:NAME[:CONFIG]:SPLIT"
        )


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    parts = source[len("hf:") :].split(":")
    if len(parts) == 2:
        return parts[0], None, parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise DataError(f"Hugging Face source {source!r} must look like hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _STDLIB_SKIP.intersection(rel.parts) or rel.name.startswith("test_"):
            continue
        files.append(path)
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
    rels = storage.list_files(uri)
    local = storage.cache_dir_for(uri, "data")
    if not rels:
        if storage.exists(uri):
            target = local / Path(uri).name
            if not target.exists():
                storage.download_file(uri, target)
            return [target]
        raise DataError(f"no files under {uri}: upload text or JSONL files there, or fix the URI")
    files = []
    for rel in rels:
        if Path(rel).suffix not in TEXT_SUFFIXES | JSONL_SUFFIXES:
            continue
        target = local / rel
        if not target.exists():
            storage.download_file(storage.join(uri, rel), target)
        files.append(target)
    if not files:
        raise DataError(f"no text (.txt/.md/.py) or JSONL files under {uri}")
    return files


def _read_documents(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix in JSONL_SUFFIXES:
        with path.open(encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{number} is not valid JSON ({exc}); JSONL needs one object per line"
                    ) from exc
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}:{number} has no string field {text_field!r}; set text_field to the right key"
                    )
                yield text
        return
    yield path.read_text(encoding="utf-8", errors="replace")


def _hf_documents(source: str, text_field: str, seed: int) -> Iterator[str]:
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
    for record in dataset.shuffle(seed=seed, buffer_size=1000):
        text = record.get(text_field)
        if isinstance(text, str) and text:
            yield text


def iter_documents(source: str, *, seed: int = 0, text_field: str = "text") -> Iterator[str]:
    """The source's documents in a deterministic, ``seed``-shuffled order."""
    if source.startswith("hf:"):
        yield from _hf_documents(source, text_field, seed)
        return
    if source == "stdlib":
        files = _stdlib_files()
    elif storage.is_s3(source):
        files = _s3_files(source)
    else:
        files = _local_files(Path(source))
    random.Random(seed).shuffle(files)
    for path in files:
        yield from _read_documents(path, text_field)


def _pack(
    documents: Iterator[str], tokenizer: Any, seq_len: int, needed: int
) -> tuple[torch.Tensor, dict[str, int]]:
    """Tokenize documents (joined by EOS) until ``needed`` sequences of ``seq_len`` are full."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    stats = {"documents": 0, "characters": 0}
    target = needed * seq_len
    batch: list[str] = []
    batch_chars = 0

    def flush() -> None:
        nonlocal batch_chars
        batch_chars = 0
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        batch.clear()

    for text in documents:
        if not text.strip():
            continue
        batch.append(text)
        stats["documents"] += 1
        stats["characters"] += len(text)
        batch_chars += len(text)
        # Tokenize in batches, but stop reading soon after enough text (~3 characters a token).
        if len(batch) >= _TOKENIZE_BATCH or batch_chars >= 3 * (target - len(stream)):
            flush()
            if len(stream) >= target:
                break
    if batch:
        flush()
    stats["tokens_read"] = len(stream)
    usable = min(len(stream) // seq_len, needed)
    ids = torch.tensor(stream[: usable * seq_len], dtype=torch.int32).view(usable, seq_len)
    return ids, stats


def prepare(parent: str, out: str, data: DataConfig) -> Manifest:
    """Phase ``data``: tokenize ``data.source`` with the parent's tokenizer into disjoint splits.

    Args:
        parent: a model artifact (parent or child) whose tokenizer is used.
        out: where to write the ``tokens`` artifact (local path or ``s3://``).
        data: the source, sequence length, splits (name -> sequences, carved in this order from the
            shuffled sequences, never overlapping) and seed.

    Raises:
        DataError: bad arguments (before any work), or a source with too few tokens.
    """
    source, seq_len, splits, seed, text_field = (
        data.source,
        data.seq_len,
        data.splits,
        data.seed,
        data.text_field,
    )
    _validate(source, seq_len, splits)
    needed = sum(splits.values())
    inputs = {"tokenizer": parent}
    if source not in ("stdlib",) and not source.startswith("hf:"):
        inputs["source"] = source
    parameters = dataclasses.asdict(data)

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        from safetensors.torch import save_file

        from puzzle.modeling.checkpoints import load_tokenizer

        tok = load_tokenizer(str(local["tokenizer"]))
        ids, stats = _pack(iter_documents(source, seed=seed, text_field=text_field), tok, seq_len, needed)
        if ids.shape[0] < needed:
            raise DataError(
                f"source {source!r} has only {stats['tokens_read']} tokens = {ids.shape[0]} sequences of "
                f"seq_len={seq_len}, but the splits need {needed} "
                f"({', '.join(f'{k}={v}' for k, v in splits.items())}): "
                "lower the split sizes or seq_len, or use a larger source"
            )
        vocab = len(tok)
        if int(ids.max()) >= vocab:
            raise DataError(
                f"token id {int(ids.max())} >= tokenizer size {vocab}: the tokenizer is inconsistent"
            )
        order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))
        ids = ids[order]
        table: dict[str, Any] = {}
        start = 0
        for name, count in splits.items():
            part = ids[start : start + count].contiguous()
            save_file({"input_ids": part}, str(staging / f"{name}.safetensors"))
            table[name] = {"file": f"{name}.safetensors", "sequences": count, "tokens": count * seq_len}
            start += count
        info = {
            "seq_len": seq_len,
            "seed": seed,
            "source": source,
            "splits": table,
            "vocab_size": vocab,
            "eos_token_id": tok.eos_token_id,
            "documents_read": stats["documents"],
            "characters_read": stats["characters"],
            "python_version": sys.version.split()[0] if source == "stdlib" else None,
        }
        (staging / SPLITS_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        log.info(
            "tokens: %d sequences x %d tokens from %d documents of %s",
            needed,
            seq_len,
            stats["documents"],
            source,
        )
        return {"seq_len": seq_len, "splits": {k: v for k, v in splits.items()}, "tokens": needed * seq_len}

    return artifacts.run_phase(
        TOKENS_KIND,
        out,
        inputs,
        parameters,
        body,
        input_kinds={"tokenizer": MODEL_KINDS},
    )


def read_splits(tokens_uri: str) -> dict[str, Any]:
    """The ``splits.json`` of a tokens artifact (sequence length, splits, source, seed)."""
    local = artifacts.materialize(tokens_uri, TOKENS_KIND)
    return json.loads((local / SPLITS_FILE).read_text())


def load_split(tokens_uri: str, split: str) -> torch.Tensor:
    """The sequences of one split of a tokens artifact, as int64 ``[n, seq_len]``."""
    from safetensors.torch import load_file

    local = artifacts.materialize(tokens_uri, TOKENS_KIND)
    info = json.loads((local / SPLITS_FILE).read_text())
    if split not in info["splits"]:
        raise DataError(
            f"tokens artifact {tokens_uri} has no split {split!r} (it has {sorted(info['splits'])}): "
            f"re-run `puzzle data` with a data.splits.{split} entry (its number of sequences)"
        )
    return load_file(str(local / info["splits"][split]["file"]))["input_ids"].long()
