"""`puzzle search` and `puzzle baseline`: pick one block per layer under speed/memory limits."""

from __future__ import annotations

import argparse
from typing import Any

CONSTRAINT_HELP = (
    "a limit, repeatable: throughput>=1.5x (tokens/s or a multiple of the parent's), latency<=900 "
    "(ms per request: prefill + every decode step; also 2s, 0.5x), memory<=2000 (MiB of weights + KV "
    "cache; also 2GiB, 0.8x), params<=1e8 (also 100M, 0.5x)"
)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--constraint",
        action="append",
        default=[],
        dest="constraints",
        metavar="LIMIT",
        help=CONSTRAINT_HELP,
    )
    p.add_argument(
        "--objective",
        default="kl_div",
        help="score column to optimise: kl_div (default), lm_loss, cosine, top1, top5",
    )
    direction = p.add_mutually_exclusive_group()
    direction.add_argument(
        "--maximize",
        dest="maximize",
        action="store_true",
        default=None,
        help="maximise the objective (default: by column; cosine/top1/top5 are maximised)",
    )
    direction.add_argument("--minimize", dest="maximize", action="store_false", help="minimise the objective")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="solve at this measured batch size only (default: every batch size in the cost table, "
        "keeping the best)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="MIP architecture search: the best block per layer under throughput/latency/memory/params limits",
        description=(
            "Choose exactly one block (attention variant + FFN variant) per layer so that the summed "
            "replace-1-block score is best while the predicted costs (from a cost table measured on the target "
            "hardware) meet every limit. Solved exactly: python-mip (CBC) gives the LP bound, reduced-cost "
            "fixing and an exact dynamic programme over Pareto fronts prove the optimum, CBC solves the reduced "
            "model. Solves at every measured batch size and keeps the best. Writes a `solutions` artifact "
            "(solutions.json: blocks per layer, objective, predicted throughput/latency/memory/params, status, "
            "solve time; pareto.csv/pareto.png for --sweep)."
        ),
        epilog=(
            "examples:\n"
            "  puzzle search runs/scores runs/costs --out runs/search -c 'throughput>=1.5x'\n"
            "  puzzle search runs/scores runs/costs --out runs/search -c 'throughput>=2x' -c 'memory<=2000' "
            "--num-solutions 5\n"
            "  puzzle search runs/scores runs/costs --out runs/sweep --sweep 'throughput>=1x:3x:9'\n"
            "  puzzle search --library block_library.json --out runs/lib-search -c 'latency<=0.5x'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scores",
        nargs="?",
        metavar="SCORES",
        help="scores artifact (or scores.csv/.json) from `puzzle score`",
    )
    p.add_argument(
        "costs", nargs="?", metavar="COSTS", help="costs artifact (or costs.json) from `puzzle costs`"
    )
    p.add_argument(
        "--library",
        default=None,
        metavar="FILE",
        help="instead of SCORES and COSTS: a published Puzzle block library JSON (layer_N -> variant -> "
        "stats/metrics), e.g. NVlabs/puzzle's Llama-3.3-70B library",
    )
    p.add_argument(
        "--out", required=True, help="output solutions artifact: local directory or s3://bucket/prefix"
    )
    _add_common(p)
    p.add_argument("--num-solutions", type=int, default=1, help="diverse solutions to return (default: 1)")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.8,
        help="diversity: each next solution shares at most alpha x layers blocks with every earlier one "
        "(default: 0.8, i.e. at least 20%% of the layers differ)",
    )
    p.add_argument(
        "--sweep",
        default=None,
        metavar="LIMIT:TO:N",
        help="also solve for N values of one limit, e.g. 'throughput>=1x:3x:9', writing pareto.csv/png",
    )
    p.add_argument(
        "--time-limit", type=float, default=60.0, help="seconds for the best solution (default: 60)"
    )
    p.add_argument(
        "--diverse-time-limit",
        type=float,
        default=0.8,
        help="seconds for each further diverse solution (default: 0.8)",
    )
    p.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    p.set_defaults(func=run_search)

    b = subparsers.add_parser(
        "baseline",
        help="a baseline architecture (greedy, noop_only, uniform_width, layer_dropping) in the search's format",
        description=(
            "Pick an architecture the simple way, at the same limits as the search, and write it as a `solutions` "
            "artifact the realize and evaluate phases read like the search's: greedy (best score per unit of "
            "cost, from the parent), noop_only (the exact search over parent-or-no-op sub-blocks), uniform_width "
            "(the same block in every layer, best score among those meeting the limits), "
            "layer_dropping (drop whole layers by block influence 1 - cos(input, output), least first)."
        ),
        epilog=(
            "examples:\n"
            "  puzzle baseline greedy runs/scores runs/costs --out runs/greedy -c 'throughput>=1.5x'\n"
            "  puzzle baseline layer_dropping runs/scores runs/costs --out runs/drop -c 'throughput>=1.5x' "
            "--child runs/child --tokens runs/tokens"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("method", choices=["greedy", "noop_only", "uniform_width", "layer_dropping"])
    b.add_argument("scores", metavar="SCORES", help="scores artifact (or scores.csv/.json)")
    b.add_argument("costs", metavar="COSTS", help="costs artifact (or costs.json)")
    b.add_argument(
        "--out", required=True, help="output solutions artifact: local directory or s3://bucket/prefix"
    )
    _add_common(b)
    b.add_argument(
        "--child",
        default=None,
        help="layer_dropping: the parent child artifact (default: the one the scores were made from)",
    )
    b.add_argument(
        "--tokens",
        default=None,
        help="layer_dropping: tokens artifact for block influence (default: the scores' tokens)",
    )
    b.add_argument(
        "--split", default="calibration", help="layer_dropping: token split (default: calibration)"
    )
    b.add_argument(
        "--max-sequences", type=int, default=32, help="layer_dropping: sequences used (default: 32)"
    )
    b.add_argument("--force", action="store_true", help="re-run even when the output is up to date")
    b.set_defaults(func=run_baseline)


def _print_solutions(out: str) -> None:
    from puzzle.search.mip import load_solutions

    data = load_solutions(out)
    parent = data["parent"]["totals"]
    print(
        f"parent: {parent['throughput']:.1f} tokens/s, {parent['latency_ms']:.2f} ms, {parent['memory_mib']:.1f} MiB, "
        f"{parent['params']:,.0f} params"
    )
    for sol in data["solutions"]:
        _print_one(sol, data["objective"])


def _print_one(sol: dict[str, Any], objective: str) -> None:
    t, rel = sol["totals"], sol["relative_to_parent"]
    value = "n/a" if sol.get("objective") is None else f"{sol['objective']:.6g}"
    extra = f", {sol['solve_seconds']:.2f} s" if "solve_seconds" in sol else ""
    print(
        f"#{sol.get('rank', 1)} [{sol['method']}, {sol.get('status', '?')}{extra}] {objective}={value} at batch "
        f"{sol['batch_size']}: {t['throughput']:.1f} tokens/s ({rel['throughput']:.2f}x), {t['latency_ms']:.2f} ms, "
        f"{t['memory_mib']:.1f} MiB, {t['params']:,.0f} params"
    )
    print("   " + " ".join(sol["blocks"]))


def run_search(args: argparse.Namespace) -> int:
    from puzzle.search.mip import SearchError, search

    if not args.library and (not args.scores or not args.costs):
        raise SearchError("give SCORES and COSTS, or --library FILE")
    search(
        args.scores,
        args.costs,
        args.out,
        objective=args.objective,
        maximize=args.maximize,
        constraints=args.constraints,
        batch_size=args.batch_size,
        num_solutions=args.num_solutions,
        diversity_alpha=args.alpha,
        sweep=args.sweep,
        library=args.library,
        time_limit=args.time_limit,
        diverse_time_limit=args.diverse_time_limit,
        force=args.force,
    )
    print(f"solutions written to {args.out}")
    _print_solutions(args.out)
    return 0


def run_baseline(args: argparse.Namespace) -> int:
    from puzzle.search.baselines import baseline

    baseline(
        args.method,
        args.scores,
        args.costs,
        args.out,
        objective=args.objective,
        maximize=args.maximize,
        constraints=args.constraints,
        batch_size=args.batch_size,
        child=args.child,
        tokens=args.tokens,
        split=args.split,
        max_sequences=args.max_sequences,
        force=args.force,
    )
    print(f"{args.method} baseline written to {args.out}")
    _print_solutions(args.out)
    return 0
