"""`puzzle export`: a child artifact -> a servable Hugging Face checkpoint (Nemotron-NAS layout)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a child as a Hugging Face checkpoint (Nemotron-NAS / DeciLM layout)",
        description=(
            "Write sharded safetensors, tokenizer, generation config, config.json with block_configs and "
            "auto_map (modeling code copied into the checkpoint: load it with "
            "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)), and EXPORT_REPORT.md "
            "listing each layer and which serving engines (vLLM, TensorRT-LLM, llama.cpp, mlx-lm) can load it."
        ),
    )
    p.add_argument("child", help="child artifact (local directory or s3:// URI)")
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="cast weights (default: keep)",
    )
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="reload the export with plain transformers and compare logits and greedy output with the child",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from puzzle.child.export import REPORT_JSON, export, export_dir, verify

    manifest = export(args.child, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(
        f"exported {manifest.summary['parameters']:,} parameters ({manifest.summary['dtype']}) to {args.out}"
    )
    import json

    report = json.loads((export_dir(args.out) / REPORT_JSON).read_text())
    for engine in report["engines"]:
        verdict = "yes" if engine["servable"] else "no, " + "; ".join(engine["reasons"])
        print(f"  {engine['engine']}: {verdict}")
    if args.verify:
        result = verify(args.out, args.child)
        print(
            f"verify: max |logit diff| {result['max_abs_logit_diff']:.2e}, greedy identical: "
            f"{result['greedy_identical']}, {result['prompt']!r} -> {result['completion']!r}"
        )
        return 0 if result["greedy_identical"] and result["max_abs_logit_diff"] <= 1e-4 else 1
    return 0
