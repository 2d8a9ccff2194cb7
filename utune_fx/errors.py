"""User errors: one line naming what was wrong and what to do.

Library code raises :class:`UtuneError` for anything the user can fix (a
model name, a file, an input shape, a model that cannot be traced). The CLI
prints ``error: <message>`` and exits with code 2; ``--debug`` shows the
traceback. Anything else escaping is a bug in utune_fx.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UtuneError(Exception):
    """An error in what the user handed in; the message is the whole story."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # always one line


def first_line(error: BaseException) -> str:
    """'ErrorType: first line of its message', for one-line reports of causes."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
