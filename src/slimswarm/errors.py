"""The one error type users see: a clear one-line message, exit code 2 from the CLI."""


class SlimswarmError(Exception):
    """Bad input (a path, a name, a field, a value): the message names it in one line.

    Messages often quote a library's own error, which may span lines; they are joined with "; " here, once, so
    every message the CLI prints (and every error body the server sends) is one line."""

    def __init__(self, message: object = "") -> None:
        text = str(message)
        if "\n" in text or "\r" in text:
            text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
        super().__init__(text)
