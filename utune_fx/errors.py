"""User errors: one line naming what was wrong and what to do.

Library code raises :class:`UtuneError` for anything the user can fix (a
model name, a file, an input shape, a model that cannot be traced). The CLI
prints ``error: <message>`` and exits with code 2; ``--debug`` shows the
traceback. Anything else escaping is a bug in utune_fx.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
MAX_MESSAGE = 1000  # characters; a message may quote what the user handed in, which can be megabytes
_KEEP_END = 300  # the end of a message says what to do: keep it whole


class UtuneError(Exception):
    """An error in what the user handed in; the message is the whole story."""

    def __init__(self, message: str):
        super().__init__(shorten(" ".join(message.split())))  # always one line, never a wall of text


class EmptyRuleError(UtuneError):
    """A rule matched nothing in the model (exit code 3, the same in match, rewrite and train)."""

    exit_code = 3


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` itself when short; else its start and its end around the count of characters left out."""
    if len(text) <= limit:
        return text
    head = limit - _KEEP_END - 40
    return f"{text[:head]} ...[{len(text) - head - _KEEP_END:,} characters]... {text[-_KEEP_END:]}"


def first_line(error: BaseException) -> str:
    """'ErrorType: first line of its message', for one-line reports of causes."""
    text = str(error).strip().splitlines()
    return shorten(f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": "), MAX_MESSAGE // 2)
