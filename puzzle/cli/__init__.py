"""The ``puzzle`` command line.

``puzzle run`` runs the whole method; one command per phase is generated from the stage graph
(:mod:`puzzle.cli.phases`); other packages add commands through the ``puzzle.commands`` entry
point group (``puzzle pipeline`` and ``puzzle trigger`` come from ``pipelines``, which the method
package does not import). Only this package prints; the library logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points

from puzzle import __version__
from puzzle.cli import phases, run
from puzzle.stages import STAGE_NAMES

ENTRY_POINT_GROUP = "puzzle.commands"
SUB_ACTIONS = ("merge", "show")
"""``puzzle bld merge`` / ``puzzle library show`` are the commands ``bld-merge`` / ``library-show``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puzzle",
        description=(
            "Puzzle: distillation-based neural architecture search that turns a trained LLM "
            "(the parent) into a faster child for a given GPU and workload."
        ),
    )
    parser.add_argument("--version", action="version", version=f"puzzle {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging: `puzzle run` prints one line per phase, -v adds each phase's log, -vv debug; "
        "other commands log their phase, -v adds debug",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.register(subparsers)
    phases.register(subparsers)
    phases.register_show(subparsers)
    phases.register_published_search(subparsers)
    for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def _sub_action(argv: list[str]) -> list[str]:
    """``bld merge ...`` -> ``bld-merge ...`` (argparse cannot give a command both inputs and actions)."""
    if len(argv) >= 2 and argv[0] in STAGE_NAMES and argv[1] in SUB_ACTIONS:
        return [f"{argv[0]}-{argv[1]}", *argv[2:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in raw[: next((i for i, a in enumerate(raw) if not a.startswith("-")), len(raw))]]
    args = parser.parse_args([*flags, *_sub_action(raw[len(flags) :])])
    levels = [logging.INFO, logging.DEBUG]
    if args.command == "run":
        levels = [logging.WARNING, *levels]
    level = logging.WARNING if args.quiet else levels[min(args.verbose, len(levels) - 1)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if level > logging.INFO:
        # One line per phase plus the phases' own progress bars: not transformers' and the hub's
        # ("Loading weights" for every model a phase loads); -v shows them.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from puzzle.cli._errors import run_handler

    return run_handler(args.func, args)
