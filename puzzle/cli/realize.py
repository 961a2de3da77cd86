"""`puzzle realize`: a child artifact from the block library and one search solution."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "realize",
        help="assemble the child of one search solution from the block library",
        description=(
            "Build the child whose per-layer blocks are those of solution INDEX of a solutions artifact "
            "(from `puzzle search` or a baseline), taking every block's weights from the library (BLD-trained "
            "variants) and the embeddings, final norm and LM head from the parent. Writes a child artifact "
            "that `puzzle distill`, `puzzle evaluate` and `puzzle export` take."
        ),
    )
    p.add_argument("--library", required=True, help="library artifact (after BLD)")
    p.add_argument("--solutions", required=True, help="solutions artifact (search or baseline)")
    p.add_argument(
        "--parent", required=True, help="the parent as an all-parent child artifact (`puzzle convert`)"
    )
    p.add_argument("--index", type=int, default=0, help="which solution (0 = the best; default 0)")
    p.add_argument(
        "--out", required=True, help="output child artifact: local directory or s3://bucket/prefix"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from puzzle.child.realize import realize

    manifest = realize(
        args.library, args.solutions, args.out, solution_index=args.index, parent_child=args.parent
    )
    s = manifest.summary
    print(f"child written to {args.out}: {s['num_parameters']:,} parameters")
    for layer, name in enumerate(s["blocks"]):
        print(f"  layer {layer:3d}: {name}")
    return 0
