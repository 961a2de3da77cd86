"""``puzzle score``: replace-1-block scores of every (layer, variant) of a library, and merging shards."""

from __future__ import annotations

import argparse
import json

from puzzle.cli.bld import str_list
from puzzle.cli.library import int_list


def register(subparsers: argparse._SubParsersAction) -> None:
    score = subparsers.add_parser(
        "score",
        help="replace-1-block scoring of a library (KL, LM loss, cosine, top-k agreement)",
        description=(
            "For every (layer, block) the parent with only that layer swapped is compared with the parent on "
            "held-out tokens. Writes scores.csv, scores.json and heatmap.png. Use `puzzle score merge` to join "
            "--shard outputs."
        ),
    )
    score.add_argument("--library", help="complete library (trained by `puzzle bld train` or not)")
    score.add_argument("--child", help="the parent (all-parent child artifact) the library came from")
    score.add_argument("--tokens", help="tokens artifact holding --split")
    score.add_argument("--out", required=True, help="output scores artifact (local path or s3://)")
    score.add_argument("--split", default="score", help="held-out split to score on (default score)")
    score.add_argument(
        "--metrics",
        type=str_list,
        default=None,
        help="comma-separated: kl_div,lm_loss,cosine,top1,top5 (default: all)",
    )
    score.add_argument(
        "--mode",
        choices=("decoupled", "full"),
        default="decoupled",
        help="decoupled: each variant with the parent's other sub-block; full: every pair",
    )
    score.add_argument("--layers", type=int_list, default=None, help="only these layers, e.g. 0,5,9")
    score.add_argument("--shard", default=None, help="i/n: score the i-th of n slices of the rows (0-based)")
    score.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    score.add_argument(
        "--max-sequences", type=int, default=None, help="use only the split's first N sequences"
    )
    score.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    score.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default float32")
    score.add_argument(
        "--merge",
        nargs="+",
        metavar="SHARD",
        default=None,
        help="instead of scoring: join these scores shards into --out",
    )
    score.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    from puzzle.library import scoring

    if args.merge:
        manifest = scoring.merge(args.merge, args.out)
    else:
        missing = [f"--{name}" for name in ("library", "child", "tokens") if not getattr(args, name)]
        if missing:
            raise scoring.ScoringError(f"{', '.join(missing)} required to score (or pass --merge SHARD ...)")
        manifest = scoring.score(
            args.library,
            args.child,
            args.tokens,
            args.out,
            split=args.split,
            metrics=tuple(args.metrics) if args.metrics else scoring.METRICS,
            shard=args.shard,
            mode=args.mode,
            layers=args.layers,
            batch_size=args.batch_size,
            max_sequences=args.max_sequences,
            device=args.device,
            dtype=args.dtype,
        )
    print(json.dumps({"out": args.out, **manifest.summary}, indent=2))
    return 0
