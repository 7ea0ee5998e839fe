"""What opening a store can fail with, and how a store's URL is shown: importable without
any database driver."""

from urllib.parse import urlsplit, urlunsplit


class StoreUnavailable(Exception):
    """The store cannot be opened: one line saying what failed and what to do."""


def redact(url: str) -> str:
    """The URL without its password (in the user part or a `password=` parameter), fit for
    a log line or an error."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if "password=" in parts.query:
        query = "&".join(
            "password=***" if item.startswith("password=") else item
            for item in parts.query.split("&")
        )
        parts = parts._replace(query=query)
    return urlunsplit(parts)
