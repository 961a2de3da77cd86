"""``puzzle bld``: blockwise local distillation of the library's variants (shardable), and merging shards."""

from __future__ import annotations

import argparse
import json

from puzzle.cli.library import int_list


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    bld = subparsers.add_parser(
        "bld", help="blockwise local distillation: train library variants, merge shards"
    )
    sub = bld.add_subparsers(dest="bld_command", metavar="ACTION")
    train = sub.add_parser(
        "train",
        help="train variants to imitate the parent's blocks (decoupled BLD)",
        description=(
            "Train every trainable variant of the library on the parent's activations with the normalised "
            "MSE of the block's output (attention variants with the parent FFN, FFN variants with the parent "
            "attention). Re-running a finished run is a no-op; a killed run resumes from its checkpoint."
        ),
    )
    train.add_argument("--library", required=True, help="library artifact to train (puzzle library build)")
    train.add_argument(
        "--child", required=True, help="the parent (all-parent child artifact) the library came from"
    )
    train.add_argument("--tokens", required=True, help="tokens artifact with the --split split")
    train.add_argument("--out", required=True, help="output library (a shard's output when --shard is given)")
    train.add_argument("--token-budget", type=int, required=True, help="training tokens per variant")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    train.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="peak AdamW learning rate (default 1e-3, tuned on SmolLM2 with small budgets)",
    )
    train.add_argument(
        "--warmup-fraction", type=float, default=0.05, help="share of steps warming up (default 0.05)"
    )
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    train.add_argument("--seed", type=int, default=0, help="orders the training sequences (default 0)")
    train.add_argument(
        "--shard", default=None, help="i/n: train the i-th of n slices of the variants (0-based)"
    )
    train.add_argument("--layers", type=int_list, default=None, help="only these layers, e.g. 0,5,9")
    train.add_argument(
        "--variants", type=str_list, default=None, help="only these variants, e.g. attn_kv1,ffn_768"
    )
    train.add_argument(
        "--coupled",
        type=str_list,
        default=None,
        help="blocks to train coupled, e.g. attn_kv1+ffn_768 (in every selected layer)",
    )
    train.add_argument("--split", default="bld", help="split of --tokens to train on (default bld)")
    train.add_argument(
        "--objective",
        choices=("block", "subblock"),
        default="block",
        help="match the block's output (default) or the sub-block's own output",
    )
    train.add_argument(
        "--val-sequences", type=int, default=4, help="held-out sequences for the before/after MSE"
    )
    train.add_argument(
        "--val-split",
        default="score",
        help="split the held-out sequences come from (default score; absent: the tail of --split)",
    )
    train.add_argument(
        "--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)"
    )
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    train.add_argument(
        "--no-autocast", action="store_true", help="train in float32 on CUDA (default bf16 autocast)"
    )
    train.set_defaults(func=run_train)

    merge = sub.add_parser("merge", help="merge BLD shard outputs into one complete library")
    merge.add_argument("shards", nargs="+", help="shard output libraries (local or s3://)")
    merge.add_argument("--out", required=True, help="merged library")
    merge.add_argument(
        "--base", default=None, help="base library URI (default: the one recorded in the shards)"
    )
    merge.set_defaults(func=run_merge)
    bld.set_defaults(func=lambda _args: bld.print_help() or 2)


def run_train(args: argparse.Namespace) -> int:
    from puzzle.library.bld import train

    manifest = train(
        args.library,
        args.child,
        args.tokens,
        args.out,
        token_budget=args.token_budget,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_fraction=args.warmup_fraction,
        seed=args.seed,
        shard=args.shard,
        layers=args.layers,
        variants=args.variants,
        coupled=args.coupled,
        split=args.split,
        objective=args.objective,
        weight_decay=args.weight_decay,
        val_sequences=args.val_sequences,
        val_split=args.val_split,
        checkpoint_every=args.checkpoint_every,
        device=args.device,
        autocast=not args.no_autocast,
    )
    print(json.dumps({"out": args.out, **manifest.summary}, indent=2))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from puzzle.library.bld import merge

    manifest = merge(args.shards, args.out, base=args.base)
    print(json.dumps({"out": args.out, **manifest.summary}, indent=2))
    return 0
