"""`puzzle costs`: measure the cost table of a block library on this machine (and calibrate it)."""

from __future__ import annotations

import argparse
import textwrap


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"batch sizes must be comma-separated integers, got {text!r}"
        ) from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "costs",
        help="measure prefill/decode latency and memory of every block variant on this machine",
        description=textwrap.fill(
            "Measure, on the current device, the cost of every distinct sub-block of a block library (attention "
            "attn_kv<N>/attn_linear/attn_noop, FFN ffn_<W>/ffn_linear/ffn_noop) and of the embeddings + final norm + "
            "LM head, at each batch size of the serving workload: prefill latency for PROMPT_LEN tokens, decode "
            "latency per step (mean over the GEN_LEN generated tokens), runtime = prefill + (gen_len - 1) x decode, "
            "parameters and memory (weights + KV cache at that batch). Timed in the project's serving loop "
            "(static KV cache, CUDA graphs and bf16 on GPU) with random weights of the real shapes, so no weights "
            "are read. Writes a `costs` artifact (costs.json with the hardware identity, costs.csv); tables from "
            "other hardware, drivers, torch versions or dtypes are refused by the search. Run it on the GPU the "
            "child will be served on.",
            width=100,
        ),
        epilog=(
            "examples:\n"
            "  puzzle costs runs/lib runs/child --out runs/costs --batch-sizes 1,16,64 --prompt-len 128 --gen-len 1024\n"
            "  puzzle costs runs/lib runs/child --out runs/costs --calibrate 5   # + predicted vs measured children"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("library", metavar="LIBRARY", help="block library artifact (local directory or s3://)")
    p.add_argument(
        "child", metavar="CHILD", help="the parent as an all-parent child artifact (`puzzle convert`)"
    )
    p.add_argument(
        "--out", required=True, help="output costs artifact: local directory or s3://bucket/prefix"
    )
    p.add_argument(
        "--batch-sizes",
        type=_sizes,
        default=[1],
        metavar="B1,B2,...",
        help="batch sizes of the serving workload (default: 1)",
    )
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (default: 64)")
    p.add_argument("--gen-len", type=int, default=64, help="generated tokens per sequence (default: 64)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N (default: auto)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="auto = bfloat16 on CUDA, float32 on CPU",
    )
    p.add_argument("--repeats", type=int, default=3, help="timing repeats; medians are kept (default: 3)")
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "vllm"],
        help="measuring backend: torch = the project's loop (default); vllm is not implemented yet",
    )
    p.add_argument(
        "--stack-layers",
        type=int,
        default=None,
        help="copies of a sub-block timed together (default: enough to exceed the GPU's L2 cache; 2 on CPU)",
    )
    p.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="then realize N random children (random weights), measure their throughput and compare it "
        "with the table's prediction (default: 0, no calibration)",
    )
    p.add_argument(
        "--calibration-out", default=None, metavar="FILE", help="write the calibration report (JSON) here"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from puzzle.search.costs import calibrate, load_costs, measure

    manifest = measure(
        args.library,
        args.child,
        args.out,
        batch_sizes=args.batch_sizes,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        device=args.device,
        dtype=None if args.dtype == "auto" else args.dtype,
        repeats=args.repeats,
        backend=args.backend,
        stack_layers=args.stack_layers,
    )
    table = load_costs(args.out)
    hw = table.hardware
    print(
        f"cost table written to {args.out}: {hw['device_name']} ({hw['dtype']}, torch {hw['torch']}, "
        f"backend {hw['backend']}), built in {manifest.summary.get('build_seconds', 0):.1f} s"
    )
    print(f"workload: prompt {table.prompt_len}, generate {table.gen_len}; runtime_ms per batch size")
    sizes = table.batch_sizes
    print(f"  {'sub-block':<20}{'params':>12}" + "".join(f"{'bs ' + str(b):>14}" for b in sizes))
    for name in ["embeddings_lm_head", *table.names]:
        entry = table.subblock(name, sizes[0])
        cells = "".join(f"{table.subblock(name, b)['runtime_ms']:>14.3f}" for b in sizes)
        print(f"  {name:<20}{entry['params']:>12,}{cells}")
    for b in sizes:
        print(f"parent at batch {b}: predicted {table.throughput(table.parent_blocks, b):,.1f} tokens/s")
    if args.calibrate > 0:
        report = calibrate(table, args.calibrate, device=args.device)
        for i, child in enumerate(report["children"]):
            for b, r in child["batches"].items():
                print(
                    f"child {i} at batch {b}: predicted {r['predicted_throughput']:,.1f} tokens/s, measured "
                    f"{r['measured_throughput']:,.1f} tokens/s, error {r['error_pct']:+.1f} %"
                )
        s = report["summary"]
        print(
            f"calibration: mean |error| {s['mean_abs_error_pct']:.1f} %, max {s['max_abs_error_pct']:.1f} %, "
            f"{100 * s['within_5pct']:.0f} % within 5 %"
        )
        if args.calibration_out:
            from puzzle.io import storage

            storage.write_json(args.calibration_out, report)
            print(f"calibration report written to {args.calibration_out}")
    return 0
