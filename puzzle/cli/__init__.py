"""The ``puzzle`` command line: one module per command group, discovered automatically.

Each module in this package defines ``register(subparsers)`` which adds its sub-command(s) and
sets ``func`` (parsed args -> exit code) with ``set_defaults``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from puzzle import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puzzle",
        description=(
            "Puzzle: distillation-based neural architecture search that turns a trained LLM "
            "(the parent) into a faster child for a given GPU and workload."
        ),
    )
    parser.add_argument("--version", action="version", version=f"puzzle {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from puzzle.cli._errors import run_handler

    return run_handler(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
