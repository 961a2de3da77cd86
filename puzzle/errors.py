"""The base of every error the library raises on purpose (bad input, missing artifacts, ...).

The CLI prints such an error as one line and exits with code 2; anything else is a bug and
keeps its traceback. Each phase module defines its own subclass, with a message that names the
field and the fix.
"""


class PuzzleError(Exception):
    """An expected failure: the message says what is wrong and how to fix it."""
