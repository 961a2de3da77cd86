"""`puzzle convert`: a parent model -> an all-parent-blocks child artifact."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a parent (HF dir, GGUF, s3://, models:/, hub id) into a child artifact",
        description=(
            "Load a Llama, Mistral, Qwen2 or Qwen3 parent and write it as a heterogeneous child whose "
            "every block is the parent's (same logits). PARENT is 'smollm2' (the embedded "
            "SmolLM2-135M-Instruct), a local Hugging Face directory, a .gguf file, an s3:// prefix, "
            "a models:/NAME/VERSION URI or a hub id (org/name; needs the hub)."
        ),
    )
    p.add_argument("parent", help="parent reference (see above)")
    p.add_argument("--out", required=True, help="output artifact: local directory or s3://bucket/prefix")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from puzzle.io import artifacts
    from puzzle.parent import convert

    if args.force:
        artifacts.delete_if_exists(args.out)
    manifest = convert(args.parent, args.out, dtype=args.dtype)
    s = manifest.summary
    print(
        f"child written to {args.out}: {s['family']}, {s['num_layers']} layers, {s['num_parameters']:,} parameters"
    )
    return 0
