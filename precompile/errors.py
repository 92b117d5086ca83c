"""Error types that the CLI maps to exit statuses.

A `UserError` is bad input (exit 2): its message is one line that names the
problem and the fix. A `VerificationError` means a converted model does not
match its original (exit 1).
"""


class UserError(Exception):
    """Bad input: the CLI prints the message on one line and exits with status 2."""


class VerificationError(Exception):
    """A converted model failed a check against its original: exit status 1."""
