"""``puzzle data``: tokenize a text source into disjoint splits of fixed-length sequences."""

from __future__ import annotations

import argparse
import json

from puzzle.data import DataError


def parse_split(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not count.isdigit():
        raise argparse.ArgumentTypeError(
            f"--split must look like NAME=SEQUENCES (e.g. bld=512), got {text!r}"
        )
    return name, int(count)


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data", help="prepare token data (calibration, BLD, scoring, GKD, eval splits)"
    )
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    prep = sub.add_parser(
        "prepare",
        help="tokenize a source and write a tokens artifact",
        description=(
            "Tokenize a text source with the parent's tokenizer, pack it into sequences of --seq-len "
            "tokens and write disjoint, deterministic splits (one safetensors file each)."
        ),
    )
    prep.add_argument(
        "--source",
        default="stdlib",
        help="'stdlib' (default: the Python standard library, offline everywhere), a local text/JSONL "
        "file or directory, an s3:// prefix, or hf:NAME[:CONFIG]:SPLIT",
    )
    prep.add_argument(
        "--tokenizer", required=True, help="child artifact whose tokenizer to use (local or s3://)"
    )
    prep.add_argument("--out", required=True, help="output tokens artifact (local path or s3://)")
    prep.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    prep.add_argument(
        "--split",
        action="append",
        type=parse_split,
        required=True,
        metavar="NAME=N",
        help="a split and its number of sequences; repeat (e.g. --split calibration=32 --split bld=512 "
        "--split score=32 --split eval=32)",
    )
    prep.add_argument("--seed", type=int, default=0, help="shuffles documents and sequences (default 0)")
    prep.add_argument(
        "--text-field", default="text", help="JSONL/dataset field holding the text (default 'text')"
    )
    prep.set_defaults(func=run_prepare)
    data.set_defaults(func=lambda _args: data.print_help() or 2)


def run_prepare(args: argparse.Namespace) -> int:
    from puzzle.data import prepare

    splits: dict[str, int] = {}
    for name, count in args.split:
        if name in splits:
            raise DataError(f"--split {name} given twice")
        splits[name] = count
    manifest = prepare(
        args.source,
        args.tokenizer,
        args.out,
        seq_len=args.seq_len,
        splits=splits,
        seed=args.seed,
        text_field=args.text_field,
    )
    print(json.dumps({"out": args.out, **manifest.summary}, indent=2))
    return 0
