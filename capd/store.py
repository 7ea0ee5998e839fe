"""Durable state: one SQLite database per daemon (stdlib sqlite3, WAL).

`pods` holds each pod's manifest and whether it was stopped; `events` holds every durable
event as the exact JSON a client receives, keyed by (pod, seq). Each append is its own
transaction, committed before the event is broadcast, so a client never sees an event that
a crash could take back. `synchronous=NORMAL` keeps commits off fsync: a process crash
loses nothing; a power cut may lose the last moments (see README).
"""

import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS pods (
    name     TEXT PRIMARY KEY,
    manifest TEXT NOT NULL,
    parent   TEXT,
    stopped  INTEGER NOT NULL DEFAULT 0,
    created  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    pod  TEXT NOT NULL,
    seq  INTEGER NOT NULL,
    ts   REAL NOT NULL,
    kind TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (pod, seq)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class PodRecord:
    name: str
    manifest: str
    parent: str | None
    stopped: bool


class Store:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- pods ---------------------------------------------------------------------------

    def add_pod(self, name: str, manifest: str, parent: str | None, created: float) -> None:
        self._db.execute(
            "INSERT INTO pods (name, manifest, parent, created) VALUES (?, ?, ?, ?)",
            (name, manifest, parent, created),
        )

    def pods(self) -> list[PodRecord]:
        rows = self._db.execute(
            "SELECT name, manifest, parent, stopped FROM pods ORDER BY created, name"
        )
        return [PodRecord(n, m, p, bool(s)) for n, m, p, s in rows]

    def pod(self, name: str) -> PodRecord | None:
        row = self._db.execute(
            "SELECT name, manifest, parent, stopped FROM pods WHERE name = ?", (name,)
        ).fetchone()
        return PodRecord(row[0], row[1], row[2], bool(row[3])) if row else None

    def set_stopped(self, name: str, stopped: bool) -> None:
        self._db.execute("UPDATE pods SET stopped = ? WHERE name = ?", (int(stopped), name))

    def delete_pod(self, name: str) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM events WHERE pod = ?", (name,))
            self._db.execute("DELETE FROM pods WHERE name = ?", (name,))

    # -- events -------------------------------------------------------------------------

    def append(self, pod: str, seq: int, ts: float, kind: str, data: bytes) -> None:
        self._db.execute(
            "INSERT INTO events (pod, seq, ts, kind, data) VALUES (?, ?, ?, ?, ?)",
            (pod, seq, ts, kind, data),
        )

    def events_after(self, pod: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` events with seq > after_seq, oldest first, as (seq, json)."""
        return self._db.execute(
            "SELECT seq, data FROM events WHERE pod = ? AND seq > ? ORDER BY seq LIMIT ?",
            (pod, after_seq, limit),
        ).fetchall()
