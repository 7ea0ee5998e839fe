"""What opening a store can fail with, and how a store's URL is shown: importable without
any database driver."""

import re

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_USER_PASSWORD = re.compile(r"^([a-z]+://[^/@:?]*:)[^@/?]*@")
_PARAM_PASSWORD = re.compile(r"([?&]password=)[^&]*")


class StoreUnavailable(Exception):
    """The store cannot be opened: one line saying what failed and what to do."""


def redact(url: str) -> str:
    """The URL without its password (in the user part or a `password=` parameter), fit for
    a log line or an error."""
    return _PARAM_PASSWORD.sub(r"\1***", _USER_PASSWORD.sub(r"\1***@", url))
