"""``puzzle run``: the whole method, end to end, from one configuration."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  puzzle run                                       # the embedded default
  puzzle run --print-config > my.yaml              # start your own config from the default
  puzzle run --config my.yaml --check              # validate only
  puzzle run --config gpu.yaml --jobs 4            # 4 GPUs: shards, baselines and the GKD chain at once
  puzzle run --config my.yaml --set output=s3://bucket/runs/a --set "search.constraints=['throughput>=2x']"
  MLFLOW_TRACKING_URI=http://mlflow:5000 puzzle run --config my.yaml --set registry.model_name=smollm2-fast
"""


def description() -> str:
    from puzzle.stages import STAGES

    lines = [
        "Run every phase of the method in order (the stage graph), each into its folder under `output`:",
        "",
    ]
    for stage in STAGES:
        where = f"{stage.folder}/" if stage.output else f"(when {stage.when} is set)"
        lines.append(f"  {stage.name:<10} {stage.summary}  -> {where}")
    lines += [
        "",
        "Resume: a phase whose output exists for the same inputs and parameters is skipped, so the same "
        "command",
        "finishes at once the second time and continues where a stopped run stopped. Delete a phase's folder "
        "(or",
        "--force STAGE) to redo it and what depends on it. Without --config: the embedded default (the real "
        "SmolLM2-135M",
        "parent, demo budgets, local storage and MLflow store). Every field: docs/config.md.",
    ]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    from puzzle.cli.phases import add_config_args

    p = subparsers.add_parser(
        "run",
        help="run every phase end to end (resumable) from one config; no config: the embedded default",
        description=description(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(p)
    p.add_argument("--check", action="store_true", help="validate the configuration and storage, then stop")
    p.add_argument(
        "--print-config", action="store_true", help="print the full resolved configuration as YAML"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run independent phases, shards and baselines at once on N worker processes: on CUDA one "
        "GPU each (of those CUDA_VISIBLE_DEVICES shows), on a CPU sharing the cores, speed measured "
        "with nothing beside it (default 1: one phase at a time, in this process)",
    )
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="rebuild this stage (repeatable) and every stage that reads it, even where up to date "
        "(e.g. after an artifact was reported corrupt)",
    )
    p.add_argument(
        "--until",
        metavar="STAGE",
        help="stop after this stage (e.g. `costs`: everything the search reads); the same command "
        "without it carries on from there",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from puzzle.config import load_config

    config = load_config(args.config, args.overrides, check_access=not args.print_config)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.check:
        from puzzle.run import check_outputs

        check_outputs(config)
        print(f"configuration OK (digest {config.digest}); output: {config.output}")
        return 0

    from puzzle.child.evaluate import read_metrics
    from puzzle.cli.phases import print_evaluation
    from puzzle.run import PhaseRecord
    from puzzle.run import run as run_all

    def show(record: PhaseRecord) -> None:
        state = "built" if record.rebuilt else "up to date"
        print(f"[{record.phase:>24}] {state:<10} {record.seconds:7.1f} s  {record.uri}", flush=True)

    print(
        f"puzzle run: parent {config.parent}, output {config.output}, constraints {config.search.constraints}"
    )
    result = run_all(
        config, on_phase=show, check_access=False, jobs=args.jobs, until=args.until, force=tuple(args.force)
    )
    if args.until is not None and args.until != "export":  # --until takes stages with an output
        print(f"\nstopped after {args.until} (--until): run without --until to carry on")
        return 0
    print()
    print_evaluation(read_metrics(result.evaluation_uri))
    print(f"\nreport: {result.evaluation_uri}/report.md (and report.html)")
    print(f"export: {result.export_uri}")
    print("  load it: AutoModelForCausalLM.from_pretrained(<export>, trust_remote_code=True)")
    if result.registration is not None:
        gate = "passed: alias champion" if result.gate.passed else "failed: " + "; ".join(result.gate.reasons)
        print(f"registered: {result.registration.uri} (alias candidate); gate {gate}")
    return 0
