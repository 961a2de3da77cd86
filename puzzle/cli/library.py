"""``puzzle library``: build the block library (every variant of every layer, initialised from the parent)."""

from __future__ import annotations

import argparse
import json


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    lib = subparsers.add_parser("library", help="block library: build it, list its variants")
    sub = lib.add_subparsers(dest="library_command", metavar="ACTION")
    build = sub.add_parser(
        "build",
        help="initialise every variant of every layer from the parent",
        description=(
            "Build the block library: per layer, GQA attention with fewer KV heads (mean-pooled K/V), "
            "linear attention (W_O.W_V), no-op; narrower FFNs (channels kept by channel contribution on "
            "calibration tokens), linear FFN (least squares), no-op."
        ),
    )
    build.add_argument(
        "--child", required=True, help="the parent as an all-parent child artifact (puzzle convert)"
    )
    build.add_argument(
        "--tokens", required=True, help="tokens artifact with a calibration split (puzzle data prepare)"
    )
    build.add_argument("--out", required=True, help="output library artifact (local path or s3://)")
    build.add_argument(
        "--kv-heads",
        type=int_list,
        default=None,
        help="KV-head counts, e.g. 8,4,2,1 (default: every divisor of the head count up to the parent's KV heads)",
    )
    build.add_argument(
        "--ffn-fractions",
        type=float_list,
        default=None,
        help="FFN widths as fractions of the parent's (default 1,0.875,0.75,0.5,0.25,0.2,0.1)",
    )
    build.add_argument(
        "--ffn-multiple",
        type=int,
        default=256,
        help="round widths to multiples of this when the parent's width is one (default 256)",
    )
    build.add_argument("--no-linear", action="store_true", help="leave out linear attention and linear FFN")
    build.add_argument("--no-noop", action="store_true", help="leave out no-op attention and no-op FFN")
    build.add_argument(
        "--layers", type=int_list, default=None, help="only these layers, e.g. 0,1,2 (default: all)"
    )
    build.add_argument(
        "--ffn-init",
        choices=("channel_contribution", "random"),
        default="channel_contribution",
        help="how narrower FFNs pick channels (random: a baseline)",
    )
    build.add_argument("--calibration-split", default="calibration", help="split of --tokens to calibrate on")
    build.add_argument(
        "--calibration-sequences",
        type=int,
        default=None,
        help="use only the calibration split's first N sequences (default: all)",
    )
    build.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    build.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    build.set_defaults(func=run_build)

    show = sub.add_parser("show", help="list a library's layers and variants (with BLD losses when trained)")
    show.add_argument("library", help="library artifact (local path or s3://)")
    show.set_defaults(func=run_show)
    lib.set_defaults(func=lambda _args: lib.print_help() or 2)


def run_build(args: argparse.Namespace) -> int:
    from puzzle.library.variants import DEFAULT_FFN_FRACTIONS, SearchSpace, build_library

    space = SearchSpace(
        attention_kv_heads=tuple(args.kv_heads) if args.kv_heads else None,
        attention_linear=not args.no_linear,
        attention_noop=not args.no_noop,
        ffn_fractions=tuple(args.ffn_fractions) if args.ffn_fractions else DEFAULT_FFN_FRACTIONS,
        ffn_linear=not args.no_linear,
        ffn_noop=not args.no_noop,
        ffn_multiple=args.ffn_multiple,
    )
    manifest = build_library(
        args.child,
        args.tokens,
        args.out,
        space=space,
        layers=args.layers,
        ffn_init=args.ffn_init,
        calibration_split=args.calibration_split,
        calibration_sequences=args.calibration_sequences,
        batch_size=args.batch_size,
        device=args.device,
    )
    print(json.dumps({"out": args.out, **manifest.summary}, indent=2))
    return 0


def run_show(args: argparse.Namespace) -> int:
    from puzzle.library.variants import Library

    lib = Library.open(args.library)
    print(
        f"library {args.library}: {len(lib.layers)} layers{' (partial: one BLD shard)' if lib.partial else ''}"
    )
    for layer in lib.layers:
        cells = []
        for name in lib.variants(layer) + lib.coupled_blocks(layer):
            info = lib.info(layer, name)
            bld = info.get("bld")
            cells.append(f"{name}({bld['initial_nmse']:.3f}->{bld['final_nmse']:.3f})" if bld else name)
        print(f"  layer {layer:3d}: {' '.join(cells)}")
    return 0
