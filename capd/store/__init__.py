"""capd's durable store: the interface (base), its backends (sqlite, the default, and
postgres), and `open_store`, which picks one from the configuration."""

from collections.abc import Callable
from pathlib import Path

from capd.store.base import (
    LAST_SEQ,
    PAGE_BYTES,
    Carried,
    OutboxEntry,
    OwedReport,
    PendingRow,
    PodRecord,
    Store,
    StoredEvent,
)
from capd.store.errors import POSTGRES_SCHEMES, StoreUnavailable, redact
from capd.store.sqlite import SCHEMA, SqliteStore

__all__ = [
    "LAST_SEQ",
    "PAGE_BYTES",
    "POSTGRES_SCHEMES",
    "SCHEMA",
    "Carried",
    "OutboxEntry",
    "OwedReport",
    "PendingRow",
    "PodRecord",
    "SqliteStore",
    "Store",
    "StoreUnavailable",
    "StoredEvent",
    "open_store",
    "redact",
]


def open_store(
    url: str | None, state_dir: Path, on_failure: Callable[[BaseException], None] | None = None
) -> tuple[Store, str]:
    """The store `url` names (`--store`), else SQLite at `<state_dir>/capd.db`, and how to
    name it in the log (password redacted). Raises StoreUnavailable."""
    if url is None:
        path = state_dir / "capd.db"
        return SqliteStore(path, on_failure), f"{path} (SQLite)"
    if not url.startswith(POSTGRES_SCHEMES):
        raise StoreUnavailable(f"--store {redact(url)}: expected a postgresql:// URL")
    # psycopg (and the fleet) load only here: a capd on SQLite starts without them.
    from capd.store.postgres import PostgresStore

    store = PostgresStore(url, on_failure)
    return store, str(store)
