"""Error codes of docs/protocol.md, Error codes, and the exception that carries one."""

from typing import Literal

ErrorCode = Literal[
    "invalid_request",
    "unknown_method",
    "frame_too_large",
    "not_found",
    "already_exists",
    "already_running",
    "not_running",
    "not_paused",
    "limit_reached",
    "forbidden",
    "provider_error",
    "tool_error",
    "timeout",
    "shutting_down",
    "internal",
]


class ProtocolError(Exception):
    """A failure that becomes an `error` reply: a code and one line a person can act on."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


def first_line(exc: BaseException) -> str:
    """The first line of an error's text: what a one-line message or log line quotes of
    an error whose text goes on (a database's, a traceback-like one)."""
    return (str(exc).strip().splitlines() or [""])[0]
