"""One command per stage of the graph (:mod:`puzzle.stages`), generated from it.

``puzzle <stage> [ITEM] INPUT... --out OUT [--config FILE] [--set section.field=VALUE]`` runs one
phase: the inputs are earlier phases' outputs (local directories or ``s3://`` URIs), the settings
come from the same configuration ``puzzle run`` reads, and ``--help`` lists every setting of the
sections the phase takes, with its default and meaning (from :mod:`puzzle.config`). Sharded
stages also take ``--shard i/n``, and ``puzzle <stage> merge SHARD... --out OUT`` joins shards.
A few stages add options of their own (``EXTRAS``) and print more than the one summary line.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable
from typing import Any

from puzzle.stages import STAGES, Stage

MERGE_SUFFIX = "-merge"
"""``puzzle bld merge`` is parsed as the command ``bld-merge`` (see :func:`puzzle.cli.main`)."""


def settings_help(sections: tuple[str, ...]) -> str:
    """The settings of ``sections``: ``section.field = default  meaning``, one per line."""
    from puzzle.config import describe_section, section_type

    lines = []
    for name in sections:
        lines.append(f"settings of section {name} (--set {name}.FIELD=VALUE or --config FILE):")
        for path, _type, default, doc in describe_section(section_type(name), name):
            shown = json.dumps(default) if not isinstance(default, str) else default
            lines.append(f"  {path} = {shown}")
            lines += textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set section.field=VALUE``, as ``puzzle run`` takes them."""
    p.add_argument(
        "--config", metavar="FILE", help="run configuration (YAML, local or s3://); default: embedded"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set gkd.lr=2e-4 (value parsed as YAML; repeatable)",
    )


def _stage_parser(subparsers: argparse._SubParsersAction, stage: Stage) -> argparse.ArgumentParser:
    item = stage.items.split(".")[-1].removesuffix("s") if stage.items else ""
    usage_inputs = " ".join(name.upper() for name in (item, *stage.config_fields, *stage.inputs) if name)
    epilog = settings_help(stage.sections) if stage.sections else ""
    kinds = "` or `".join(stage.kinds)
    if stage.shards:
        epilog = f"join shards: puzzle {stage.name} merge SHARD... --out OUT\n\n{epilog}"
    p = subparsers.add_parser(
        stage.name,
        help=stage.summary,
        description=f"Phase {stage.name}: {stage.summary}. Writes a `{kinds}` artifact at --out.",
        usage=f"puzzle {stage.name} {usage_inputs} --out OUT [options]",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if stage.items:
        p.add_argument("item", metavar=item.upper(), help=f"one of {stage.items}")
    for name in stage.config_fields:
        p.add_argument(name, metavar=name.upper(), help=f"sets {name} (see `puzzle run --help`)")
    for name, producer in stage.inputs.items():
        p.add_argument(
            name, metavar=name.upper(), help=f"the {name} artifact (output of `puzzle {producer}`)"
        )
    p.add_argument("--out", required=True, help="output artifact: local directory or s3://bucket/prefix")
    add_config_args(p)
    if stage.gpu:
        p.add_argument(
            "--device", default=None, help="overrides the config's device (auto, cpu, cuda, cuda:N)"
        )
    if stage.shards:
        p.add_argument("--shard", default=None, metavar="I/N", help="run the i-th of n shards (0-based)")
    extra = EXTRAS.get(stage.name)
    if extra is not None:
        extra[0](p)
    p.set_defaults(func=lambda args, stage=stage: run_stage(stage, args))
    return p


def _merge_parser(subparsers: argparse._SubParsersAction, stage: Stage) -> None:
    p = subparsers.add_parser(
        f"{stage.name}{MERGE_SUFFIX}",
        prog=f"puzzle {stage.name} merge",
        description=f"Join the shards of `puzzle {stage.name} --shard i/n` into one `{stage.kind}` artifact.",
    )
    p.add_argument("shards", nargs="+", metavar="SHARD", help="the shards' outputs (local or s3://)")
    p.add_argument("--out", required=True, help="the merged artifact")
    p.set_defaults(func=lambda args, stage=stage: _run_merge(stage, args))


def register(subparsers: argparse._SubParsersAction) -> None:
    for stage in STAGES:
        if not stage.output:
            continue  # the registry stage runs inside `puzzle run` and the pipeline
        if stage.name == "evaluate":
            _evaluate_parser(subparsers, stage)
            continue
        _stage_parser(subparsers, stage)
        if stage.shards:
            _merge_parser(subparsers, stage)


def stage_kind(name: str) -> str:
    return next(stage.kind for stage in STAGES if stage.name == name)


def stage_config(args: argparse.Namespace) -> Any:
    from puzzle.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"device={args.device}")
    return load_config(args.config, overrides, check_access=False)


def run_stage(stage: Stage, args: argparse.Namespace) -> int:
    from puzzle.io.artifacts import check_output

    check_output(args.out, stage.kinds)  # the publish rule, before any work
    config = stage_config(args)
    for name in stage.config_fields:
        config = config.replace(**{name: getattr(args, name)})
    inputs = {name: getattr(args, name) for name in stage.inputs}
    positional, kwargs = stage.arguments(config, inputs)
    if stage.items:
        positional = [args.item, *positional]
    if getattr(args, "shard", None):
        kwargs["shard"] = args.shard
    extra = EXTRAS.get(stage.name)
    if extra is not None and extra[1] is not None:
        kwargs.update(extra[1](args))
    manifest = stage.resolve()(*positional, args.out, **kwargs)
    print(f"{stage.name}: {stage.kind} written to {args.out}")
    figures = {k: v for k, v in manifest.summary.items() if isinstance(v, int | float | str | bool)}
    if figures:
        print("  " + ", ".join(f"{k} {_fmt(v)}" for k, v in figures.items()))
    if extra is not None and extra[2] is not None:
        return int(extra[2](args, manifest) or 0)
    return 0


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _run_merge(stage: Stage, args: argparse.Namespace) -> int:
    from puzzle.io.artifacts import check_output

    check_output(args.out, stage.kinds)
    manifest = stage.resolve("merge")(list(args.shards), args.out)
    print(f"{stage.name}: {len(args.shards)} shards merged into {args.out} ({manifest.kind})")
    return 0


# --------------------------------------------------------------------------- per-stage extras


def register_published_search(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search-published",
        help="the MIP on a published Puzzle block library (scores and costs per block, one JSON)",
        description=(
            "Solve the search on a published block library JSON (layer_N -> variant -> stats/metrics), "
            "e.g. NVlabs/puzzle's Llama-3.3-70B library, under search.constraints: the same MIP as `puzzle "
            "search`, without exact pair scoring, coupled BLD or measurement (the library has its figures)."
        ),
        epilog=settings_help(("search",)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("block_library", metavar="FILE", help="the block library JSON")
    p.add_argument("--out", required=True, help="output solutions artifact: local directory or s3://")
    add_config_args(p)
    p.add_argument(
        "--sweep",
        default=None,
        metavar="LIMIT:TO:N",
        help="also solve for N values of one limit, e.g. 'throughput>=1x:3x:9', writing pareto.csv/png",
    )
    p.set_defaults(func=_run_published)


def _run_published(args: argparse.Namespace) -> int:
    from puzzle.search.mip import search

    config = stage_config(args)
    search(None, None, args.out, config.search, library=args.block_library, sweep=args.sweep)
    print(f"search: solutions written to {args.out}")
    return _print_solutions(args, None)


def _print_solutions(args: argparse.Namespace, _manifest: Any) -> int:
    from puzzle.search.mip import load_solutions

    data = load_solutions(args.out)
    parent = data["parent"]["totals"]
    print(
        f"parent: {parent['throughput']:.1f} tokens/s, {parent['latency_ms']:.2f} ms, "
        f"{parent['memory_mib']:.1f} MiB, {parent['params']:,.0f} params"
    )
    for sol in data["solutions"]:
        t, rel = sol["totals"], sol["relative_to_parent"]
        value = "n/a" if sol.get("objective") is None else f"{sol['objective']:.6g}"
        print(
            f"#{sol.get('rank', 1)} [{sol['method']}, {sol.get('status', '?')}] {data['objective']}={value} "
            "at "
            f"batch {sol['batch_size']}: {t['throughput']:.1f} tokens/s ({rel['throughput']:.2f}x), "
            f"{t['latency_ms']:.2f} ms, {t['memory_mib']:.1f} MiB, {t['params']:,.0f} params"
        )
        print("   " + " ".join(sol["blocks"]))
    return 0


def _costs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="then realize N random children (random weights), measure them whole and compare with the "
        "table's prediction",
    )
    p.add_argument(
        "--calibration-out", default=None, metavar="FILE", help="write the calibration report here"
    )


def _print_costs(args: argparse.Namespace, _manifest: Any) -> int:
    from puzzle.search.costs import calibrate, load_costs

    table = load_costs(args.out)
    sizes = table.batch_sizes
    print(f"  {'sub-block':<20}{'params':>12}" + "".join(f"{'ms @bs ' + str(b):>14}" for b in sizes))
    for name in ["embeddings_lm_head", *table.names]:
        cells = "".join(f"{table.subblock(name, b)['runtime_ms']:>14.3f}" for b in sizes)
        print(f"  {name:<20}{table.subblock(name, sizes[0])['params']:>12,}{cells}")
    if args.calibrate > 0:
        config = stage_config(args)
        report = calibrate(table, args.calibrate, device=config.device)
        s = report["summary"]
        print(
            f"calibration: mean |error| {s['mean_abs_error_pct']:.1f} %, max {s['max_abs_error_pct']:.1f} %, "
            f"{100 * s['within_5pct']:.0f} % within 5 %"
        )
        if args.calibration_out:
            from puzzle.io import storage

            storage.write_json(args.calibration_out, report)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        action="store_true",
        help="reload the export with plain transformers and compare logits and greedy output with the child",
    )


def _print_export(args: argparse.Namespace, _manifest: Any) -> int:
    from puzzle.child.export import REPORT_JSON, export_dir, verify

    report = json.loads((export_dir(args.out) / REPORT_JSON).read_text())
    for engine in report["engines"]:
        print(
            f"  {engine['engine']}: {'yes' if engine['servable'] else 'no, ' + '; '.join(engine['reasons'])}"
        )
    if args.verify:
        result = verify(args.out, args.child)
        print(
            f"verify: max |logit diff| {result['max_abs_logit_diff']:.2e}, greedy identical: "
            f"{result['greedy_identical']}, {result['prompt']!r} -> {result['completion']!r}"
        )
        return 0 if result["greedy_identical"] and result["max_abs_logit_diff"] <= 1e-4 else 1
    return 0


def _library_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_int_list, default=None, help="only these layers, e.g. 0,5,9")


def _bld_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_int_list, default=None, help="only these layers, e.g. 0,5,9")
    p.add_argument(
        "--variants", type=_str_list, default=None, help="only these variants, e.g. attn_kv1,ffn_768"
    )
    p.add_argument(
        "--coupled",
        type=_str_list,
        default=None,
        help="blocks to train coupled, e.g. attn_kv1+ffn_768 (in every selected layer)",
    )


def _scoring_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_int_list, default=None, help="only these layers, e.g. 0,5,9")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


Extra = tuple[
    Callable[[argparse.ArgumentParser], None],
    Callable[[argparse.Namespace], dict[str, Any]] | None,
    Callable[[argparse.Namespace, Any], int] | None,
]

EXTRAS: dict[str, Extra] = {
    "library": (_library_args, lambda a: {"layers": a.layers}, None),
    "bld": (_bld_args, lambda a: {"layers": a.layers, "variants": a.variants, "coupled": a.coupled}, None),
    "scoring": (_scoring_args, lambda a: {"layers": a.layers}, None),
    "costs": (_costs_args, None, _print_costs),
    "search": (lambda _p: None, None, _print_solutions),
    "export": (_export_args, None, _print_export),
}


# --------------------------------------------------------------------------- evaluate


def _evaluate_parser(subparsers: argparse._SubParsersAction, stage: Stage) -> None:
    p = subparsers.add_parser(
        stage.name,
        help=stage.summary,
        description=(
            "Evaluate children against the parent: KL(parent || child), LM loss / perplexity, next-token "
            "accuracy (and accuracy kept, with 95% bootstrap intervals), top-1/top-5 agreement on the "
            "held-out and out-of-domain splits at the serving context, measured throughput, latency and "
            "memory at every batch size of costs.batch_sizes, search.constraints checked on what was "
            "measured; report.md / "
            "report.html with a Pareto plot."
        ),
        epilog=settings_help(stage.sections),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "children", nargs="+", metavar="NAME=CHILD", help="children to evaluate, e.g. puzzle=runs/x/distilled"
    )
    p.add_argument("--parent", required=True, help="the parent artifact")
    p.add_argument("--tokens", required=True, help="tokens artifact")
    p.add_argument(
        "--baseline", action="append", default=[], metavar="NAME", help="mark a child as a baseline"
    )
    p.add_argument("--out", required=True, help="output evaluation artifact: local directory or s3://")
    add_config_args(p)
    p.add_argument("--device", default=None, help="overrides the config's device (auto, cpu, cuda, cuda:N)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from puzzle.child.evaluate import EvaluateError, evaluate_children, read_metrics
    from puzzle.io.artifacts import check_output

    check_output(args.out, stage_kind("evaluate"))
    children: dict[str, str] = {}
    for item in args.children:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise EvaluateError(f"child {item!r} must look like NAME=URI, e.g. puzzle=runs/default/distilled")
        children[name] = uri
    unknown = [b for b in args.baseline if b not in children]
    if unknown:
        raise EvaluateError(f"--baseline {unknown[0]} is not one of the children ({', '.join(children)})")
    config = stage_config(args)
    evaluate_children(
        children,
        args.parent,
        args.tokens,
        args.out,
        config.evaluate,
        config.costs,
        config.search,
        details={name: {"role": "baseline"} for name in args.baseline},
        device=config.device,
    )
    metrics = read_metrics(args.out)
    print(f"evaluation written to {args.out} (report.md, report.html)")
    print_evaluation(metrics)
    return 0


def print_evaluation(metrics: dict[str, Any]) -> None:
    """The parent's figures, then one line per child: accuracy kept at measured speedup."""
    primary = metrics.get("primary")
    parent = metrics["models"]["parent"]
    print(
        f"  parent: accuracy {parent['accuracy']:.4f}, perplexity {parent['perplexity']:.2f}, "
        f"{parent['throughput']:.1f} tokens/s"
    )
    for name in sorted((n for n in metrics["models"] if n != "parent"), key=lambda n: (n != primary, n)):
        row = metrics["models"][name]
        kept = row.get("accuracy_kept")
        kept_text = "undefined (parent accuracy 0)" if kept is None else f"{kept:.1%}"
        print(
            f"  {name}: accuracy kept {kept_text} at {row['speedup']:.2f}x measured throughput, "
            f"KL {row['kl_div']:.4f}, perplexity {row['perplexity']:.2f}"
        )


# --------------------------------------------------------------------------- library show


def register_show(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "library-show",
        prog="puzzle library show",
        description="List a library's layers and variants (with the BLD losses before -> after when "
        "trained).",
    )
    p.add_argument("library", help="library artifact (local path or s3://)")
    p.set_defaults(func=_run_show)


def _run_show(args: argparse.Namespace) -> int:
    from puzzle.library.variants import Library

    lib = Library.open(args.library)
    print(
        f"library {args.library}: {len(lib.layers)} "
        f"layers{' (partial: one BLD shard)' if lib.partial else ''}"
    )
    for layer in lib.layers:
        cells = []
        for name in lib.variants(layer) + lib.coupled_blocks(layer):
            bld = lib.info(layer, name).get("bld")
            cells.append(f"{name}({bld['initial_nmse']:.3f}->{bld['final_nmse']:.3f})" if bld else name)
        print(f"  layer {layer:3d}: {' '.join(cells)}")
    return 0
