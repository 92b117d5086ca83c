"""Error types that the CLI maps to exit statuses.

A `UserError` is bad input (exit 2): its message is one line that names the
problem and the fix. A `VerificationError` means a converted model does not
match its original (exit 1).
"""


def one_line(text: str) -> str:
    """Messages echo user input (paths, YAML values, JSON keys); a line break inside one must not split them."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class UserError(Exception):
    """Bad input: the CLI prints the message on one line and exits with status 2."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class VerificationError(Exception):
    """A converted model failed a check against its original: exit status 1."""

    def __str__(self) -> str:
        return one_line(super().__str__())
