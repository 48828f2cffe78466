"""The one exception type that reaches the user as a one-line message (no traceback)."""


class UserError(Exception):
    """Bad input or environment: the CLI prints ``Error: <message>`` on one line and exits non-zero."""
