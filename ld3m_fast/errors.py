"""User-facing errors.

Anything a user can cause (a missing folder, a mismatched checkpoint, a NaN loss)
raises `LD3MError`; the CLI prints its message on one line and exits with code 2.
Programming errors stay ordinary exceptions with tracebacks.
"""


class LD3MError(Exception):
    """An error caused by the user's input, reported as one line by the CLI."""


class PriorError(LD3MError):
    """A prior folder or checkpoint that cannot be loaded as asked."""
