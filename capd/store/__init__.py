"""capd's durable store: the interface (base) and its backends (sqlite, postgres)."""

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
from capd.store.sqlite import SCHEMA, SqliteStore

__all__ = [
    "LAST_SEQ",
    "PAGE_BYTES",
    "SCHEMA",
    "Carried",
    "OutboxEntry",
    "OwedReport",
    "PendingRow",
    "PodRecord",
    "SqliteStore",
    "Store",
    "StoredEvent",
]
