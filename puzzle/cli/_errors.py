"""Turn the library's expected errors into one clear line and exit code 2 (no traceback)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from puzzle.errors import PuzzleError
from puzzle.modeling import BlockConfigError


def run_handler(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    try:
        return int(func(args) or 0)
    except (PuzzleError, BlockConfigError) as exc:
        print(f"puzzle: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("puzzle: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
