"""Real text for tests that need more than the embedded corpus gives a tiny split: a standard-library
module's source (stable for a given Python, unlike the project's own files)."""

import textwrap
from pathlib import Path

STDLIB_TEXT = Path(textwrap.__file__).read_text()
