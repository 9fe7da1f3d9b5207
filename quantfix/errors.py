"""One exception type for bad input: the CLI prints its message as one line and exits 2."""


class QuantfixError(Exception):
    """A problem the user can fix; the message names the fix."""
