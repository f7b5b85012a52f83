"""The one error type users see: a clear one-line message, exit code 2 from the CLI."""


class SlimswarmError(Exception):
    """Bad input (a path, a name, a field, a value): the message names it in one line."""
