"""The PostgreSQL store (`capd --store postgresql://…`), with SQLite's guarantees: events
committed before a client sees them, gapless `seq`, all-or-none groups, restore after a
crash. Same tables as capd.store.sqlite; `data` and reports are BYTEA, so the JSON spliced
into replies comes back byte for byte (JSONB would re-order and re-space it).

One connection does every read and write, on a thread of its own ("capd-store"): the
Store interface is synchronous (reads happen inside synchronous event paths) and a round
trip must not stall the event loop more than it has to. Writes are queued to the thread in
order and return at once; reads queue behind them and block their caller until answered,
inside the open transaction, so they see every write made before them. The batch's
COMMIT is one more queued op, whose completion the loop awaits (capd.store.batch), and
nothing a client is sent leaves before it. The thread runs libpq's pipeline mode: queued
writes go out without waiting for each answer, so a batch costs about one round trip plus
a read's, whatever its size; a run of plain appends is queued as one `executemany`.
bench/pgstore measures the store against psycopg inserting the same rows straight.

Driver: psycopg 3 (binary), not asyncpg. Measured here through this design (loop thread →
store thread → server on a Unix socket, 6,000 events, batches of 1/50/500 appends; two
runs, 2 busy cores): psycopg in pipeline mode 2.0k-4.4k / 15k-30k / 22k-31k events/s;
asyncpg on a private loop in the thread 2.6k-3.3k / 8.7k-10k / 8.7k-9.8k, because each
statement awaits its own round trip (asyncpg has no pipeline). asyncpg catches up only
when consecutive inserts are merged into one `executemany` (40k / 60k-87k), which capd's
mixed batches (events, outbox, pending, pods) do not allow: with one other statement per
five events it fell to 9k / 7.7k against psycopg's 6k / 12k. A read through the thread
costs 134 µs with psycopg, 155 µs with asyncpg. psycopg also keeps the thread plain
synchronous code (no second event loop in the process) and takes libpq URLs as psql does.

No read pool: every Store read must see the open batch (a pool connection sees only what
committed), and the one read that must not — `reports_for`, the outbox's — filters the
open batch's rows out by their transaction id instead. A pool would save ~40 µs per read
(a direct read is ~70-100 µs) at the cost of that guarantee; the fleet's read-only queries
can use one later.

A write that fails inside a batch aborts PostgreSQL's whole transaction (unlike SQLite,
which undoes one savepoint), and its caller has already moved on: the batch is broken and
capd stops (capd.store.batch), nothing of it acked; the restart restores what committed.
Outside a running loop each write is its own transaction and raises to its caller.
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import conninfo

from capd.fleet.lease import margin_s
from capd.fleet.schema import FENCE_SQLSTATE, FLEET_MIGRATION, LeaseLost
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
from capd.store.batch import BatchBroken, GroupCommit, StoreFailed
from capd.store.errors import StoreUnavailable, redact
from protocol.errors import ProtocolError, first_line

log = logging.getLogger(__name__)

T = TypeVar("T")
Op = Callable[[psycopg.Cursor[Any]], Any]
OpOf = Callable[[psycopg.Cursor[Any]], T]

READ_TIMEOUT_S = 60.0
"""How long the event loop waits for a read before it takes the server for gone and capd
stops (exit 75), rather than freezing every pod on a stalled server or a partition with
no reset; a fleet node waits at most until its lease watchdog would stop it anyway."""
CONNECT_TIMEOUT_S = 10
"""How long start-up waits for the server, unless the URL says (`connect_timeout`)."""
MIGRATION_LOCK = 0x63617064
"""The advisory lock ("capd") held while the schema is checked and upgraded: several nodes
starting on one database migrate one at a time."""

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE pods (
        name     TEXT PRIMARY KEY,
        manifest TEXT NOT NULL,
        parent   TEXT,
        stopped  BOOLEAN NOT NULL DEFAULT false,
        created  DOUBLE PRECISION NOT NULL,
        team     TEXT,
        worktree TEXT,
        pending_manifest TEXT
    );
    CREATE TABLE events (
        pod  TEXT NOT NULL,
        seq  BIGINT NOT NULL,
        ts   DOUBLE PRECISION NOT NULL,
        kind TEXT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (pod, seq)
    );
    CREATE TABLE outbox (
        id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        target  TEXT NOT NULL,
        pod     TEXT NOT NULL,
        payload BYTEA NOT NULL
    );
    CREATE INDEX outbox_target ON outbox (target, id);
    CREATE TABLE pending (
        id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        pod     TEXT NOT NULL,
        kind    TEXT NOT NULL,
        turn_id BYTEA,
        source  BYTEA,
        text    BYTEA NOT NULL,
        created DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX pending_pod ON pending (pod, id);
    CREATE TABLE carried (
        pod    TEXT PRIMARY KEY,
        tokens BIGINT NOT NULL,
        usd    DOUBLE PRECISION
    );
    CREATE TABLE read_cursors (
        reader TEXT NOT NULL,
        target TEXT NOT NULL,
        seq    BIGINT NOT NULL,
        PRIMARY KEY (reader, target)
    );
    CREATE TABLE received (
        pod      TEXT NOT NULL,
        event_id BYTEA NOT NULL,
        PRIMARY KEY (pod, event_id)
    );
    """,
    FLEET_MIGRATION,
    f"CREATE INDEX events_permissions ON events (pod, seq) WHERE {PERMISSION_EVENTS};",
)
"""Schema version n+1 is MIGRATIONS[n] applied to version n. What a client sends as free
text (a queued run's text, turn_id and source, a report's event_id) is BYTEA: TEXT cannot
hold the NUL character JSON lets them carry."""

INSERT_EVENT = "INSERT INTO events (pod, seq, ts, kind, data) VALUES (%s, %s, %s, %s, %b)"


def _text(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def _str(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


class PostgresStore:
    def __init__(self, url: str, on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.url = redact(url)
        conn = _connect(url, self.url)
        try:
            _migrate(conn, self.url)
            self.server_version = conn.info.server_version
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._ops: queue.SimpleQueue[tuple[Op, concurrent.futures.Future[Any] | None] | None]
        self._ops = queue.SimpleQueue()
        self._pipeline: psycopg.Pipeline | None = None
        self._in_tx = False
        """Whether the thread has a batch's transaction open (thread-side state)."""
        self._failed: BaseException | None = None
        """The first error of the open transaction: the rest of it is skipped."""
        self._rows_waiting: list[tuple[Any, ...]] = []
        """Rows of lone events the open batch appended, not queued yet (loop side)."""
        self._closed = False
        self._fence: tuple[str, int, float] | None = None
        """(node, incarnation, ttl) once this store writes for a fleet node: every
        transaction then runs `capd_fence` right before its COMMIT (capd.fleet)."""
        self.node: str | None = None
        """The fleet node this store writes for: its start-up reads see that node's pods."""
        self.renewed_at: float | None = None
        """time.monotonic() when the last fenced COMMIT that succeeded was sent: the node's
        lease runs at least until then + ttl (the database stamped it later)."""
        self._thread = threading.Thread(target=self._run, name="capd-store", daemon=True)
        self._thread.start()
        self._batch = GroupCommit(self) if on_failure is None else GroupCommit(self, on_failure)

    def __str__(self) -> str:
        version = self.server_version
        return f"{self.url} (PostgreSQL {version // 10000}.{version % 10000})"

    # -- the store thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except psycopg.Error as exc:  # leaving the pipeline on a connection that broke
            log.debug("store connection closed: %r", exc)

    def _serve(self) -> None:
        with self._conn.pipeline() as pipeline:
            self._pipeline = pipeline
            cursor = self._conn.cursor(binary=True)
            while (item := self._ops.get()) is not None:
                op, done = item
                if done is not None and not done.set_running_or_notify_cancel():
                    continue  # its waiter gave up (a read that timed out)
                try:
                    result = op(cursor)
                except BaseException as exc:
                    if done is None:
                        log.error("store op failed outside a batch: %r", exc)
                    else:
                        done.set_exception(exc)
                else:
                    if done is not None:
                        done.set_result(result)

    def _post(self, op: Op) -> None:
        self._check_open()
        self._send_rows()
        self._ops.put((op, None))

    def _submit(self, op: OpOf[T]) -> "concurrent.futures.Future[T]":
        self._check_open()
        self._send_rows()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._ops.put((op, done))
        return done

    def _check_open(self) -> None:
        """A closed store has no thread to run ops: fail at once instead of waiting for
        ever (a task cancelled at loop teardown, after shutdown, may still write)."""
        if self._closed:
            raise StoreFailed("the store is closed")

    def _send_rows(self) -> None:
        """Queue the plain event rows gathered so far as one `executemany`, ahead of the op
        about to be queued: one op for a run of appends, not one each."""
        if rows := self._rows_waiting:
            self._rows_waiting = []
            self._ops.put((self._joined(lambda c: c.executemany(INSERT_EVENT, rows)), None))

    def _sync(self) -> None:
        assert self._pipeline is not None
        self._pipeline.sync()

    def _rollback(self, cursor: psycopg.Cursor[Any]) -> None:
        self._in_tx, self._failed = False, None
        with contextlib.suppress(psycopg.Error):
            self._sync()  # what the failure left of the pipeline
        cursor.execute("ROLLBACK")
        self._sync()

    def _begin_tx(self, cursor: psycopg.Cursor[Any]) -> None:
        self._in_tx, self._failed = True, None
        try:
            cursor.execute("BEGIN")
        except Exception as exc:  # the batch's writes are then skipped, its COMMIT fails
            self._failed = exc

    def _commit_tx(self, cursor: psycopg.Cursor[Any]) -> None:
        failed = self._failed
        if failed is not None:
            self._rollback(cursor)
            raise failed
        fence, sent = self._fence, time.monotonic()  # before the fence can have run
        try:
            if fence is not None:
                cursor.execute("SELECT capd_fence(%s, %s, %s)", fence)
            cursor.execute("COMMIT")
            self._sync()
        except BaseException as exc:
            self._rollback(cursor)
            if fence is not None and getattr(exc, "sqlstate", None) == FENCE_SQLSTATE:
                raise LeaseLost(
                    f"node {fence[0]} (incarnation {fence[1]}) lost its lease: another "
                    "node took its pods, or it could not renew in time; nothing of the "
                    "last batch was committed"
                ) from exc
            raise
        self._in_tx = False
        if fence is not None:
            self.renewed_at = sent

    def _alone(self, op: OpOf[T]) -> OpOf[T]:
        """`op` as a transaction of its own: committed, or rolled back and raised."""

        def run(cursor: psycopg.Cursor[Any]) -> T:
            self._begin_tx(cursor)
            try:
                result = op(cursor)
            except BaseException:
                self._rollback(cursor)
                raise
            self._commit_tx(cursor)
            return result

        return run

    def _joined(self, op: Op) -> Op:
        """`op` as a write of the open batch: skipped once the batch has failed."""

        def run(cursor: psycopg.Cursor[Any]) -> None:
            if self._failed is None:
                try:
                    op(cursor)
                except Exception as exc:
                    self._failed = exc

        return run

    def _reading(self, op: OpOf[T]) -> OpOf[T]:
        """`op` as a read: inside the open batch it sees its writes, and its failure (or an
        earlier write's, which the read's sync brings back) breaks the batch."""

        def run(cursor: psycopg.Cursor[Any]) -> T:
            if not self._in_tx:
                return op(cursor)
            if self._failed is not None:
                raise BatchBroken(f"PostgreSQL aborted the batch: {self._failed!r}")
            try:
                return op(cursor)
            except Exception as exc:
                self._failed = exc
                raise BatchBroken(f"PostgreSQL aborted the batch: {exc!r}") from exc

        return run

    # -- the fleet ----------------------------------------------------------------------

    def join_fleet(self, node: str, incarnation: int, ttl_s: float) -> None:
        """Write as fleet node `node` from now on: every transaction fenced by its
        `incarnation`, an open transaction ended by the server after ttl/3 idle (a
        partitioned node's locks must not outlive its lease), start-up reads limited to
        the node's pods, and the connection named for audits (`capd/<node>/<incarnation>`)."""
        timeout_ms = max(1, round(ttl_s * 1000 / 3))

        def op(c: psycopg.Cursor[Any]) -> None:
            c.execute(f"SET idle_in_transaction_session_timeout = {timeout_ms}")
            c.execute(
                "SELECT set_config('application_name', %s, false)", (f"capd/{node}/{incarnation}",)
            )
            self._sync()
            self._fence = (node, incarnation, ttl_s)

        self._submit(op).result()
        self.node = node
        self.renewed_at = time.monotonic()

    def renew_lease(self) -> None:
        """A write whose only effect is the fence before its COMMIT: renews the node's
        lease when no batch did lately (capd.fleet.lease)."""
        self._write(lambda c: None)

    # -- what the loop calls ------------------------------------------------------------

    def _write(self, op: Op) -> None:
        """A write: queued into the open batch, or its own transaction outside a loop."""
        if self._batch.write():
            self._post(self._joined(op))
        else:
            self._submit(self._alone(op)).result()

    def _read(self, op: OpOf[T]) -> T:
        done = self._submit(self._reading(op))
        try:
            return done.result(self._read_timeout())
        except BatchBroken as exc:
            self._batch.broken(exc)
            raise
        except concurrent.futures.TimeoutError:
            done.cancel()
            lost = BatchBroken("the store did not answer a read in time (server stalled?)")
            self._batch.broken(lost)
            raise lost from None
        except psycopg.OperationalError as exc:
            if self._conn.broken:  # the server is gone: only a commit would notice it
                self._batch.broken(exc)
            raise

    def _read_timeout(self) -> float:
        fence, renewed = self._fence, self.renewed_at
        if fence is None or renewed is None:
            return READ_TIMEOUT_S
        ttl = fence[2]
        return max(0.1, renewed + ttl - margin_s(ttl) - time.monotonic())

    def _write_read(self, op: OpOf[T]) -> T:
        """A write whose caller needs its answer (a new row's id): waits like a read."""
        if self._batch.write():
            return self._read(op)
        return self._submit(self._alone(op)).result()

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        def op(cursor: psycopg.Cursor[Any]) -> list[tuple[Any, ...]]:
            cursor.execute(sql, params)
            return cursor.fetchall()

        return self._read(op)

    def _row(self, sql: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # -- group commit -------------------------------------------------------------------

    def begin(self) -> None:
        self._post(self._begin_tx)

    def commit(self) -> "asyncio.Future[None] | None":
        done = self._submit(self._commit_tx)
        if asyncio._get_running_loop() is None:
            done.result()  # no loop (closing after it ended): committed on return
            return None
        return asyncio.wrap_future(done)

    @property
    def batch(self) -> GroupCommit:
        return self._batch

    def after_commit(self, callback: Callable[[], None]) -> None:
        self._batch.after_commit(callback)

    async def flush(self) -> None:
        await self._batch.flush()

    def close(self) -> None:
        self._batch.close()
        self._closed = True
        self._ops.put(None)
        self._thread.join()
        self._conn.close()

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
        """A new pod (with its lease on this node, in a fleet). A name another node took
        is `already_exists`: ON CONFLICT DO NOTHING, as a refused INSERT would abort the
        whole batch."""
        params = (name, manifest, parent, created, team, worktree)
        insert = (
            "INSERT INTO pods (name, manifest, parent, created, team, worktree)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING name"
        )
        if self.node is not None:
            # The family (top-level ancestor) of a child is its parent's: adoption keeps
            # a tree on one node. A parent is named by its socket, <dir>/<name>.sock.
            insert = (
                f"WITH added AS ({insert}) INSERT INTO leases (pod, node, epoch, family) "
                "SELECT name, %s, 1, COALESCE((SELECT family FROM leases WHERE pod = "
                "substring(%s from '([^/]+)\\.sock$')), name) FROM added RETURNING pod"
            )
            params = (*params, self.node, parent)

        def op(c: psycopg.Cursor[Any]) -> bool:
            c.execute(insert, params)
            return c.fetchone() is not None

        if not self._write_read(op):
            raise ProtocolError("already_exists", f"a pod named {name} already exists")

    def pods(self) -> list[PodRecord]:
        """Every pod; in a fleet, those this node holds the lease of."""
        columns = "name, manifest, parent, stopped, team, worktree, pending_manifest"
        if self.node is None:
            rows = self._rows(f"SELECT {columns} FROM pods ORDER BY created, name", ())
        else:
            rows = self._rows(
                f"SELECT {columns} FROM pods JOIN leases ON pod = name WHERE node = %s "
                "ORDER BY created, name",
                (self.node,),
            )
        return [PodRecord(*row) for row in rows]

    def set_manifest(self, name: str, manifest: str) -> None:
        self._write(
            lambda c: c.execute("UPDATE pods SET manifest = %s WHERE name = %s", (manifest, name))
        )

    def set_pending_manifest(self, name: str, manifest: str | None) -> None:
        self._write(
            lambda c: c.execute(
                "UPDATE pods SET pending_manifest = %s WHERE name = %s", (manifest, name)
            )
        )

    def set_stopped(self, name: str, stopped: bool, report: OwedReport | None = None) -> None:
        """Mark the pod stopped or not, with the `shut_down` report a stop owes its parent."""

        def op(c: psycopg.Cursor[Any]) -> None:
            c.execute("UPDATE pods SET stopped = %s WHERE name = %s", (stopped, name))
            if report is not None:
                _insert_report(c, name, report)

        self._write(op)

    def delete_pod(self, name: str, socket: str, carried: Carried | None = None) -> None:
        """Remove the pod's state for good, all or none: its children (parent = `socket`)
        become top-level pods and reports still owed to it are dropped; reports the pod
        owes its parent stay. `carried` is its parent's new total of what deleted
        descendants spent, this pod's whole subtree now included."""

        def op(c: psycopg.Cursor[Any]) -> None:
            if carried is not None:
                c.execute(
                    "INSERT INTO carried (pod, tokens, usd) VALUES (%s, %s, %s) "
                    "ON CONFLICT (pod) DO UPDATE SET tokens = excluded.tokens, usd = excluded.usd",
                    (carried.pod, carried.tokens, carried.usd),
                )
            c.execute("DELETE FROM carried WHERE pod = %s", (name,))
            c.execute("UPDATE pods SET parent = NULL WHERE parent = %s", (socket,))
            c.execute("DELETE FROM outbox WHERE target = %s", (socket,))
            for table in ("events", "pending", "received"):
                c.execute(f"DELETE FROM {table} WHERE pod = %s", (name,))
            c.execute("DELETE FROM read_cursors WHERE reader = %s OR target = %s", (name, name))
            c.execute("DELETE FROM pods WHERE name = %s", (name,))

        self._write(op)

    def carried(self) -> list[Carried]:
        """What each pod's deleted descendants spent (pods with none are left out)."""
        return [Carried(*row) for row in self._rows("SELECT pod, tokens, usd FROM carried", ())]

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
        """Events with, all or none, the report to the parent they cause, the deletion of
        the `pending` rows they use up, the `event_id`s of the reports they receive and
        the pod's new `manifest` (a `reconfigured`)."""
        rows = [(pod, *event) for event in events]
        if not (report or consumed or received or manifest is not None) and self._batch.write():
            self._rows_waiting += rows  # queued with the next op, at the latest the COMMIT
            return
        received_rows = [(pod, _text(event_id)) for event_id in received]

        def op(c: psycopg.Cursor[Any]) -> None:
            if len(rows) == 1:
                c.execute(INSERT_EVENT, rows[0])
            else:
                c.executemany(INSERT_EVENT, rows)
            if manifest is not None:
                c.execute(
                    "UPDATE pods SET manifest = %s, pending_manifest = NULL WHERE name = %s",
                    (manifest, pod),
                )
            if report is not None:
                _insert_report(c, pod, report)
            if consumed:
                c.execute("DELETE FROM pending WHERE id = ANY(%s)", (list(consumed),))
            if received_rows:
                c.executemany(
                    "INSERT INTO received (pod, event_id) VALUES (%s, %b) ON CONFLICT DO NOTHING",
                    received_rows,
                )

        self._write(op)

    def received(self, pod: str, event_id: str) -> bool:
        """Whether the pod has received a report with this `event_id`."""
        row = self._row(
            "SELECT 1 FROM received WHERE pod = %s AND event_id = %b", (pod, _text(event_id))
        )
        return row is not None

    def received_ids(self, pod: str) -> set[str]:
        """Every `event_id` the store keeps as received by the pod (a journal loads them
        once, rather than asking for each report it receives)."""
        rows = self._rows("SELECT event_id FROM received WHERE pod = %s", (pod,))
        return {row[0].decode() for row in rows}

    def events_after(self, pod: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` events with seq > after_seq, oldest first, as (seq, json); fewer
        once they hold PAGE_BYTES (always at least one), so a page of large events is not
        read whole into memory. An empty list means there are no more."""

        def op(c: psycopg.Cursor[Any]) -> list[tuple[int, bytes]]:
            c.execute(
                "SELECT seq, data FROM events WHERE pod = %s AND seq > %s ORDER BY seq LIMIT %s",
                (pod, after_seq, limit),
            )
            return page_of(iter(c.fetchone, None))

        return self._read(op)

    def restore_start(self, pod: str) -> int:
        """The first seq a restart reads: the `restore_from` of the pod's latest
        `context_compacted` (never past that event itself), else 1."""
        return self.context_start(pod, LAST_SEQ)

    def context_start(self, pod: str, before_seq: int) -> int:
        """The first seq to read to rebuild the pod's context as it stood just before
        `before_seq`: the `restore_from` of its latest `context_compacted` before then
        (never past that event itself), else 1."""
        return start_after(self._latest_compaction(pod, before_seq))

    def _latest_compaction(self, pod: str, before_seq: int) -> Compaction | None:
        row = self._row(
            "SELECT seq, data FROM events WHERE pod = %s AND kind = 'context_compacted' "
            "AND seq < %s ORDER BY seq DESC LIMIT 1",
            (pod, before_seq),
        )
        return None if row is None else (row[0], orjson.loads(row[1]))

    def usage_totals(self, pod: str) -> tuple[int, int, float | None]:
        """The pod's (input tokens, output tokens, dollars or None) over its whole history:
        its latest `context_compacted`'s `usage`, then the `assistant_message`s after it,
        the dollars added in seq order as the journal adds them (see capd.store.sqlite)."""
        after, totals = totals_at(self._latest_compaction(pod, LAST_SEQ))
        # `->` keeps the JSON text as stored: `->>` would fail on a \u0000 inside it.
        rows = self._rows(
            "SELECT (convert_from(data, 'UTF8')::json -> 'usage')::text FROM events "
            "WHERE pod = %s AND seq > %s AND kind = 'assistant_message' ORDER BY seq",
            (pod, after),
        )
        return add_usages(totals, rows)

    def latest_rewound(self, pod: str, first: int, before_seq: int) -> tuple[int, bytes] | None:
        """The pod's latest `rewound` with `first` <= seq < `before_seq`, as (seq, json)."""
        row = self._row(
            "SELECT seq, data FROM events WHERE pod = %s AND kind = 'rewound' "
            "AND seq >= %s AND seq < %s ORDER BY seq DESC LIMIT 1",
            (pod, first, before_seq),
        )
        return None if row is None else (row[0], row[1])

    def turn_start_seq(self, pod: str, turn_id: str) -> int | None:
        """The seq of the `turn_start` of the pod's turn `turn_id`; None when it has none.
        Compared in Python: PostgreSQL's JSON text extraction refuses a \\u0000, and a
        turn_id is a client's string."""
        rows = self._rows(
            "SELECT seq, data FROM events WHERE pod = %s AND kind = 'turn_start' ORDER BY seq",
            (pod,),
        )
        for seq, data in rows:
            if orjson.loads(data).get("turn_id") == turn_id:
                return int(seq)
        return None

    def last_turns_start(self, pod: str, turns: int) -> int | None:
        """The seq of the `turn_start` of the pod's last `turns` turns; None when it has
        fewer."""
        row = self._row(
            "SELECT seq FROM events WHERE pod = %s AND kind = 'turn_start' "
            "ORDER BY seq DESC LIMIT 1 OFFSET %s",
            (pod, turns - 1),
        )
        return row[0] if row else None

    def events_of_kind_after(
        self, pod: str, after_seq: int, *kinds: str
    ) -> list[tuple[int, bytes]]:
        """Every event of these `kinds` with seq > after_seq, oldest first, as (seq, json)."""
        rows = self._rows(
            "SELECT seq, data FROM events WHERE pod = %s AND seq > %s AND kind = ANY(%s) "
            "ORDER BY seq",
            (pod, after_seq, list(kinds)),
        )
        return [(seq, data) for seq, data in rows]

    def permission_events(self, pod: str) -> list[bytes]:
        """The pod's `reconfigured` and `permission_resolved` events, oldest first."""
        rows = self._rows(
            f"SELECT data FROM events WHERE pod = %s AND {PERMISSION_EVENTS} ORDER BY seq",
            (pod,),
        )
        return [data for (data,) in rows]

    # -- outbox -------------------------------------------------------------------------

    def report_targets(self) -> list[str]:
        """Where reports are owed; in a fleet, those owed by this node's pods."""
        return [row[0] for row in self._rows(f"SELECT DISTINCT target {self._owed()}", self._me())]

    def outbox_counts(self) -> tuple[int, int]:
        """(reports owed, distinct parents they are owed to), by this node's pods in a fleet."""
        row = self._row(f"SELECT COUNT(*), COUNT(DISTINCT target) {self._owed()}", self._me())
        assert row is not None
        return row[0], row[1]

    def _owed(self) -> str:
        if self.node is None:
            return "FROM outbox"
        return "FROM outbox o JOIN leases l ON l.pod = o.pod WHERE l.node = %s"

    def _me(self) -> tuple[str, ...]:
        return () if self.node is None else (self.node,)

    def reports_for(self, target: str, limit: int) -> list[OutboxEntry]:
        """The oldest `limit` committed reports still owed to `target`, in the order they
        were made: the open batch's own (its transaction id on them) wait for its commit,
        which pokes the outbox."""
        rows = self._rows(
            "SELECT id, pod, payload FROM outbox WHERE target = %s "
            "AND xmin IS DISTINCT FROM pg_current_xact_id_if_assigned()::xid "
            "ORDER BY id LIMIT %s",
            (target, limit),
        )
        return [OutboxEntry(*row) for row in rows]

    def report_delivered(self, report_id: int) -> None:
        self._write(lambda c: c.execute("DELETE FROM outbox WHERE id = %s", (report_id,)))

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
        params = (pod, kind, _text(turn_id), _text(source), _text(text), time.time())

        def op(c: psycopg.Cursor[Any]) -> int:
            c.execute(
                "INSERT INTO pending (pod, kind, turn_id, source, text, created) "
                "VALUES (%s, %s, %b, %b, %b, %s) RETURNING id",
                params,
            )
            row = c.fetchone()
            assert row is not None
            return int(row[0])

        return self._write_read(op)

    def pending(self, pod: str) -> list[PendingRow]:
        rows = self._rows(
            "SELECT id, kind, turn_id, source, text, created FROM pending "
            "WHERE pod = %s ORDER BY id",
            (pod,),
        )
        return [
            PendingRow(i, kind, _str(turn), _str(source), _str(text) or "", created)
            for i, kind, turn, source, text, created in rows
        ]

    def drop_pending(self, ids: list[int]) -> None:
        self._write(lambda c: c.execute("DELETE FROM pending WHERE id = ANY(%s)", (ids,)))

    # -- read cursors -------------------------------------------------------------------

    def read_cursor(self, reader: str, target: str) -> int:
        row = self._row(
            "SELECT seq FROM read_cursors WHERE reader = %s AND target = %s", (reader, target)
        )
        return row[0] if row else 0

    def set_read_cursor(self, reader: str, target: str, seq: int) -> None:
        self._write(
            lambda c: c.execute(
                "INSERT INTO read_cursors (reader, target, seq) VALUES (%s, %s, %s) "
                "ON CONFLICT (reader, target) DO UPDATE SET seq = excluded.seq",
                (reader, target, seq),
            )
        )


def _insert_report(c: psycopg.Cursor[Any], pod: str, report: OwedReport) -> None:
    c.execute(
        "INSERT INTO outbox (target, pod, payload) VALUES (%s, %s, %b)",
        (report.target, pod, report.payload),
    )


def _connect(url: str, shown: str) -> psycopg.Connection[Any]:
    """The store's connection (autocommit: the batches' BEGIN and COMMIT are explicit),
    or StoreUnavailable saying in one line what failed and what to do."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        why = first_line(exc)
        raise StoreUnavailable(f"--store {shown}: not a PostgreSQL URL: {why}") from None
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    params.setdefault("application_name", "capd")
    try:
        return psycopg.connect(autocommit=True, **params)
    except psycopg.Error as exc:
        raise StoreUnavailable(
            f"cannot connect to the store at {shown}: {first_line(exc)} "
            "(is PostgreSQL running, and do the URL's host, database, user and password "
            "match it? see README: PostgreSQL)"
        ) from None


def _migrate(conn: psycopg.Connection[Any], shown: str) -> None:
    """Bring the schema to the newest version, one node at a time, in one transaction."""
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            have = (row[0] if row else None) or 0
            if have > len(MIGRATIONS):
                raise StoreUnavailable(
                    f"the store at {shown} has schema version {have}, newer than this capd "
                    f"knows ({len(MIGRATIONS)}): run the capd that wrote it, or a newer one"
                )
            for version in range(have, len(MIGRATIONS)):
                conn.execute(MIGRATIONS[version])
            if have < len(MIGRATIONS):
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version VALUES (%s)", (len(MIGRATIONS),))
    except psycopg.Error as exc:
        raise StoreUnavailable(
            f"cannot set up capd's tables in the store at {shown}: {first_line(exc)} "
            "(the URL's user needs a database it owns: createdb -O USER capd)"
        ) from None
