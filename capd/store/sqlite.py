"""The SQLite store: one database per daemon (stdlib sqlite3, WAL), the default.

`pods` holds each pod's manifest and whether it was stopped; `events` holds every durable
event as the exact JSON a client receives, keyed by (pod, seq). Writes commit in groups
(capd.store.batch): the first write of a loop turn opens a transaction, one COMMIT ends it
at the end of the turn, and what a client is sent waits for that commit (`after_commit`), so
a client never sees an event that a crash could take back. A write that must be all or none
(an append with its report, a delete) is a savepoint inside the batch. `outbox` holds
reports to parent sockets until they are acked; a report is committed in the same
transaction as the event that causes it. `pending` holds acked work a pod has not started
yet — queued runs and buffered notifications — and each row is deleted in the same
transaction as the event that consumes it. `read_cursors` remembers how far each pod has
read each child's output (`read_pod_output`). `received` holds the `event_id` of the
reports a pod received before the events its restore reads (committed with the
`context_compacted` that moved that start past them; the newer ones a restore finds in its
events), so a re-sent report is known as a duplicate however old it is, without reading old
history and without a write per report. `carried` holds what a pod's deleted descendants
had spent (their events go with them), written in the transaction that deletes one, so a
budget over the pod still counts it.
`synchronous=NORMAL` keeps commits off fsync: a process crash loses nothing; a power cut
may lose the last moments (see README).
"""

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from capd.store.base import (
    LAST_SEQ,
    PERMISSION_EVENTS,
    Carried,
    Compaction,
    OutboxEntry,
    OwedReport,
    PendingRow,
    PodRecord,
    StoredEvent,
    add_usages,
    page_of,
    start_after,
    totals_at,
)
from capd.store.batch import BatchBroken, GroupCommit

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS pods (
    name     TEXT PRIMARY KEY,
    manifest TEXT NOT NULL,
    parent   TEXT,
    stopped  INTEGER NOT NULL DEFAULT 0,
    created  REAL NOT NULL,
    team     TEXT,
    worktree TEXT,
    pending_manifest TEXT
);
CREATE TABLE IF NOT EXISTS events (
    pod  TEXT NOT NULL,
    seq  INTEGER NOT NULL,
    ts   REAL NOT NULL,
    kind TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (pod, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_permissions ON events (pod, seq) WHERE {PERMISSION_EVENTS};
CREATE TABLE IF NOT EXISTS outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    target  TEXT NOT NULL,
    pod     TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_target ON outbox (target, id);
CREATE TABLE IF NOT EXISTS pending (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    pod     TEXT NOT NULL,
    kind    TEXT NOT NULL,
    turn_id TEXT,
    source  TEXT,
    text    TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_pod ON pending (pod, id);
CREATE TABLE IF NOT EXISTS carried (
    pod    TEXT PRIMARY KEY,
    tokens INTEGER NOT NULL,
    usd    REAL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS read_cursors (
    reader TEXT NOT NULL,
    target TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (reader, target)
) WITHOUT ROWID;
"""

RECEIVED_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    pod      TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (pod, event_id)
) WITHOUT ROWID
"""

RECEIVED_BACKFILL = """
INSERT OR IGNORE INTO received (pod, event_id)
SELECT pod, json_extract(CAST(data AS TEXT), '$.payload.event_id') FROM events
WHERE kind = 'pod_event_received'
    AND json_type(CAST(data AS TEXT), '$.payload.event_id') = 'text'
"""
"""A database older than `received` fills it from the reports its events hold."""

POD_COLUMNS_ADDED = ("team", "worktree", "pending_manifest")
"""`pods` columns a database made before issue 21 lacks; each is added, NULL for old rows."""


class SqliteStore:
    def __init__(
        self, path: Path, on_failure: Callable[[BaseException], None] | None = None
    ) -> None:
        _make_private(path)
        # Autocommit mode: the batch's BEGIN/COMMIT are explicit, and outside a loop a
        # lone statement commits by itself (a savepoint group at its RELEASE).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._add_pod_columns()
        self._add_received()
        self._batch = GroupCommit(self) if on_failure is None else GroupCommit(self, on_failure)
        self._first_open_report: int | None = None
        """The outbox id of the first report the open batch adds: the outbox does not
        deliver it, nor any later one, before it commits."""

    def _add_pod_columns(self) -> None:
        have = {row[1] for row in self._db.execute("PRAGMA table_info(pods)")}
        for column in POD_COLUMNS_ADDED:
            if column not in have:
                self._db.execute(f"ALTER TABLE pods ADD COLUMN {column} TEXT")

    def _add_received(self) -> None:
        """Create `received`, filled from the stored reports when the database predates it,
        in one transaction: a crash between the two cannot leave it empty."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'received'"
            if self._db.execute(exists).fetchone() is None:
                self._db.execute(RECEIVED_SCHEMA)
                self._db.execute(RECEIVED_BACKFILL)

    # -- group commit -------------------------------------------------------------------

    def begin(self) -> None:
        self._db.execute("BEGIN")

    def commit(self) -> None:
        self._db.execute("COMMIT")
        self._first_open_report = None

    @property
    def batch(self) -> GroupCommit:
        return self._batch

    def after_commit(self, callback: Callable[[], None]) -> None:
        self._batch.after_commit(callback)

    async def flush(self) -> None:
        await self._batch.flush()

    def close(self) -> None:
        self._batch.close()
        self._db.close()

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement, in the open batch (or committed at once outside a loop)."""
        self._batch.write()
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            self._check_batch(exc)
            raise

    @contextlib.contextmanager
    def _group(self) -> Iterator[None]:
        """All or none: a savepoint inside the batch (outside a loop, its own transaction,
        committed at its RELEASE). A failure undoes the group alone and raises."""
        self._batch.write()
        self._db.execute("SAVEPOINT grp")
        try:
            yield
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK TO grp")
                self._db.execute("RELEASE grp")
            self._check_batch(exc)
            raise
        self._db.execute("RELEASE grp")

    def _check_batch(self, exc: BaseException) -> None:
        """A statement that failed undid itself, unless SQLite rolled the whole batch back
        (a full disk, an I/O error): then writes other callers made are gone too."""
        if self._batch.pending and not self._db.in_transaction:
            self._batch.broken(BatchBroken(f"SQLite rolled the batch back: {exc!r}"))

    # -- pods ---------------------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        manifest: str,
        parent: str | None,
        created: float,
        team: str | None = None,
        worktree: str | None = None,
    ) -> None:
        self._write(
            "INSERT INTO pods (name, manifest, parent, created, team, worktree)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, manifest, parent, created, team, worktree),
        )

    def pods(self) -> list[PodRecord]:
        rows = self._db.execute(
            "SELECT name, manifest, parent, stopped, team, worktree, pending_manifest"
            " FROM pods ORDER BY created, name"
        )
        return [PodRecord(n, m, p, bool(s), t, w, pm) for n, m, p, s, t, w, pm in rows]

    def set_manifest(self, name: str, manifest: str) -> None:
        self._write("UPDATE pods SET manifest = ? WHERE name = ?", (manifest, name))

    def set_pending_manifest(self, name: str, manifest: str | None) -> None:
        self._write("UPDATE pods SET pending_manifest = ? WHERE name = ?", (manifest, name))

    def set_stopped(self, name: str, stopped: bool, report: OwedReport | None = None) -> None:
        """Mark the pod stopped or not, with the `shut_down` report a stop owes its parent."""
        with self._group():
            self._db.execute("UPDATE pods SET stopped = ? WHERE name = ?", (int(stopped), name))
            if report is not None:
                self._insert_report(name, report)

    def delete_pod(self, name: str, socket: str, carried: Carried | None = None) -> None:
        """Remove the pod's state for good, in one transaction: its children (parent =
        `socket`) become top-level pods and reports still owed to it are dropped. Reports
        the pod itself owes its parent stay in the outbox. `carried` is its parent's new
        total of what deleted descendants spent, this pod's whole subtree now included."""
        with self._group():
            if carried is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO carried (pod, tokens, usd) VALUES (?, ?, ?)",
                    (carried.pod, carried.tokens, carried.usd),
                )
            self._db.execute("DELETE FROM carried WHERE pod = ?", (name,))
            self._db.execute("UPDATE pods SET parent = NULL WHERE parent = ?", (socket,))
            self._db.execute("DELETE FROM outbox WHERE target = ?", (socket,))
            self._db.execute("DELETE FROM events WHERE pod = ?", (name,))
            self._db.execute("DELETE FROM pending WHERE pod = ?", (name,))
            self._db.execute("DELETE FROM received WHERE pod = ?", (name,))
            self._db.execute(
                "DELETE FROM read_cursors WHERE reader = ? OR target = ?", (name, name)
            )
            self._db.execute("DELETE FROM pods WHERE name = ?", (name,))

    def carried(self) -> list[Carried]:
        """What each pod's deleted descendants spent (pods with none are left out)."""
        return [Carried(*row) for row in self._db.execute("SELECT pod, tokens, usd FROM carried")]

    # -- events -------------------------------------------------------------------------

    def append(
        self,
        pod: str,
        events: list[StoredEvent],
        report: OwedReport | None = None,
        consumed: Sequence[int] = (),
        received: Sequence[str] = (),
        manifest: str | None = None,
    ) -> None:
        """Commit events and, in the same transaction, the report to the parent they cause,
        the deletion of the `pending` rows they use up, the `event_id`s of the reports
        they receive and the pod's new `manifest` (a `reconfigured`): a crash keeps all or
        none."""
        insert = "INSERT INTO events (pod, seq, ts, kind, data) VALUES (?, ?, ?, ?, ?)"
        rows = [(pod, *event) for event in events]
        if len(rows) == 1 and report is None and not consumed and not received and manifest is None:
            self._write(insert, rows[0])
            return
        with self._group():
            self._db.executemany(insert, rows)
            if manifest is not None:
                self._db.execute(
                    "UPDATE pods SET manifest = ?, pending_manifest = NULL WHERE name = ?",
                    (manifest, pod),
                )
            if report is not None:
                self._insert_report(pod, report)
            self._db.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in consumed])
            self._db.executemany(
                "INSERT OR IGNORE INTO received (pod, event_id) VALUES (?, ?)",
                [(pod, event_id) for event_id in received],
            )

    def received(self, pod: str, event_id: str) -> bool:
        """Whether the pod has received a report with this `event_id`."""
        row = self._db.execute(
            "SELECT 1 FROM received WHERE pod = ? AND event_id = ?", (pod, event_id)
        ).fetchone()
        return row is not None

    def received_ids(self, pod: str) -> set[str]:
        """Every `event_id` the store keeps as received by the pod (a journal loads them
        once, rather than asking for each report it receives)."""
        rows = self._db.execute("SELECT event_id FROM received WHERE pod = ?", (pod,))
        return {row[0] for row in rows}

    def events_after(self, pod: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` events with seq > after_seq, oldest first, as (seq, json); fewer
        once they hold PAGE_BYTES (always at least one), so a page of large events is not
        read whole into memory. An empty list means there are no more."""
        return page_of(
            self._db.execute(
                "SELECT seq, data FROM events WHERE pod = ? AND seq > ? ORDER BY seq LIMIT ?",
                (pod, after_seq, limit),
            )
        )

    def restore_start(self, pod: str) -> int:
        """The first seq a restart reads: the `restore_from` of the pod's latest
        `context_compacted` (never past that event itself), else 1. The scan runs back from
        the newest event, so it reads only the events since that compaction."""
        return self.context_start(pod, LAST_SEQ)

    def context_start(self, pod: str, before_seq: int) -> int:
        """The first seq to read to rebuild the pod's context as it stood just before
        `before_seq`: the `restore_from` of its latest `context_compacted` before then
        (never past that event itself), else 1."""
        return start_after(self._latest_compaction(pod, before_seq))

    def _latest_compaction(self, pod: str, before_seq: int) -> Compaction | None:
        """The pod's latest `context_compacted` before `before_seq`: (seq, the event)."""
        row = self._db.execute(
            "SELECT seq, data FROM events WHERE pod = ? AND kind = 'context_compacted' "
            "AND seq < ? ORDER BY seq DESC LIMIT 1",
            (pod, before_seq),
        ).fetchone()
        return None if row is None else (row[0], orjson.loads(row[1]))

    def usage_totals(self, pod: str) -> tuple[int, int, float | None]:
        """The pod's (input tokens, output tokens, dollars or None) over its whole history,
        as a restart derives them: its latest `context_compacted`'s `usage`, then the
        `assistant_message`s after it (`add_usages`)."""
        after, totals = totals_at(self._latest_compaction(pod, LAST_SEQ))
        rows = self._db.execute(
            "SELECT json_extract(CAST(data AS TEXT), '$.usage') "
            "FROM events WHERE pod = ? AND seq > ? AND kind = 'assistant_message' ORDER BY seq",
            (pod, after),
        )
        return add_usages(totals, rows)

    def latest_rewound(self, pod: str, first: int, before_seq: int) -> tuple[int, bytes] | None:
        """The pod's latest `rewound` with `first` <= seq < `before_seq`, as (seq, json)."""
        return self._db.execute(
            "SELECT seq, data FROM events WHERE pod = ? AND kind = 'rewound' "
            "AND seq >= ? AND seq < ? ORDER BY seq DESC LIMIT 1",
            (pod, first, before_seq),
        ).fetchone()

    def turn_start_seq(self, pod: str, turn_id: str) -> int | None:
        """The seq of the `turn_start` of the pod's turn `turn_id`; None when it has none."""
        row = self._db.execute(
            "SELECT seq FROM events WHERE pod = ? AND kind = 'turn_start' "
            "AND json_extract(CAST(data AS TEXT), '$.turn_id') = ?",
            (pod, turn_id),
        ).fetchone()
        return row[0] if row else None

    def last_turns_start(self, pod: str, turns: int) -> int | None:
        """The seq of the `turn_start` of the pod's last `turns` turns; None when it has
        fewer. The primary key (pod, seq) lets SQLite walk back from the newest event and
        stop at that `turn_start`."""
        row = self._db.execute(
            "SELECT seq FROM events WHERE pod = ? AND kind = 'turn_start' "
            "ORDER BY seq DESC LIMIT 1 OFFSET ?",
            (pod, turns - 1),
        ).fetchone()
        return row[0] if row else None

    def events_of_kind_after(
        self, pod: str, after_seq: int, *kinds: str
    ) -> list[tuple[int, bytes]]:
        """Every event of these `kinds` with seq > after_seq, oldest first, as (seq, json):
        one pass over the pod's events, however many kinds."""
        marks = ", ".join("?" * len(kinds))
        return self._db.execute(
            f"SELECT seq, data FROM events WHERE pod = ? AND seq > ? AND kind IN ({marks}) "
            "ORDER BY seq",
            (pod, after_seq, *kinds),
        ).fetchall()

    def permission_events(self, pod: str) -> list[bytes]:
        """The pod's `reconfigured` and `permission_resolved` events, oldest first (the
        planner, without statistics, would scan the primary key instead)."""
        rows = self._db.execute(
            "SELECT data FROM events INDEXED BY events_permissions "
            f"WHERE pod = ? AND {PERMISSION_EVENTS} ORDER BY seq",
            (pod,),
        )
        return [data for (data,) in rows]

    # -- outbox -------------------------------------------------------------------------

    def _insert_report(self, pod: str, report: OwedReport) -> None:
        cursor = self._db.execute(
            "INSERT INTO outbox (target, pod, payload) VALUES (?, ?, ?)",
            (report.target, pod, report.payload),
        )
        if self._first_open_report is None and self._db.in_transaction and self._batch.pending:
            self._first_open_report = cursor.lastrowid

    def report_targets(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT target FROM outbox")]

    def outbox_counts(self) -> tuple[int, int]:
        """(reports owed, distinct parents they are owed to)."""
        return self._db.execute("SELECT COUNT(*), COUNT(DISTINCT target) FROM outbox").fetchone()

    def reports_for(self, target: str, limit: int) -> list[OutboxEntry]:
        """The oldest `limit` committed reports still owed to `target`, in the order they
        were made: one the open batch adds is not sent before it commits (and then the
        outbox is poked)."""
        before = LAST_SEQ if self._first_open_report is None else self._first_open_report
        rows = self._db.execute(
            "SELECT id, pod, payload FROM outbox WHERE target = ? AND id < ? ORDER BY id LIMIT ?",
            (target, before, limit),
        )
        return [OutboxEntry(*row) for row in rows]

    def report_delivered(self, report_id: int) -> None:
        self._write("DELETE FROM outbox WHERE id = ?", (report_id,))

    # -- pending work -------------------------------------------------------------------

    def add_pending(
        self,
        pod: str,
        kind: str,
        text: str,
        *,
        turn_id: str | None = None,
        source: str | None = None,
    ) -> int:
        cursor = self._write(
            "INSERT INTO pending (pod, kind, turn_id, source, text, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (pod, kind, turn_id, source, text, time.time()),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def pending(self, pod: str) -> list[PendingRow]:
        rows = self._db.execute(
            "SELECT id, kind, turn_id, source, text, created FROM pending "
            "WHERE pod = ? ORDER BY id",
            (pod,),
        )
        return [PendingRow(*row) for row in rows]

    def drop_pending(self, ids: list[int]) -> None:
        with self._group():
            self._db.executemany("DELETE FROM pending WHERE id = ?", [(i,) for i in ids])

    # -- read cursors -------------------------------------------------------------------

    def read_cursor(self, reader: str, target: str) -> int:
        row = self._db.execute(
            "SELECT seq FROM read_cursors WHERE reader = ? AND target = ?", (reader, target)
        ).fetchone()
        return row[0] if row else 0

    def set_read_cursor(self, reader: str, target: str, seq: int) -> None:
        self._write(
            "INSERT INTO read_cursors (reader, target, seq) VALUES (?, ?, ?) "
            "ON CONFLICT (reader, target) DO UPDATE SET seq = excluded.seq",
            (reader, target, seq),
        )


def _make_private(path: Path) -> None:
    """The database and its -wal and -shm files, 0600. SQLite creates those two with the
    database's mode, so the database is made before SQLite opens it; files an older capd
    left 0644 are narrowed too."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)
