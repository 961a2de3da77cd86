"""``python -m puzzle``: the ``puzzle`` command."""

import sys

from puzzle.cli import main

sys.exit(main())
