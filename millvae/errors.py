"""The one exception type users see: a one-line message saying what was expected and what came."""


class MillvaeError(Exception):
    """Bad input or environment; the CLI prints the message on one line and exits non-zero."""
