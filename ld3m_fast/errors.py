"""User-facing errors.

Anything a user can cause (a missing folder, a mismatched checkpoint, a NaN loss)
raises `LD3MError`; the CLI prints its message on one line and exits with code 2.
Programming errors stay ordinary exceptions with tracebacks.
"""


class LD3MError(Exception):
    """An error caused by the user's input, reported as one line by the CLI."""


class PriorError(LD3MError):
    """A prior folder or checkpoint that cannot be loaded as asked."""


def one_line(text: str) -> str:
    """`text` on one line: newlines, tabs and other control characters (a path may hold any of
    them) written as escapes, the way `repr` writes them; everything else unchanged."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
