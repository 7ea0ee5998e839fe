"""What every durable store holds and offers: the records it returns and the `Store`
interface the daemon writes and reads through (SQLite in capd.store.sqlite, PostgreSQL in
capd.store.postgres).

Writes are grouped: every write joins the batch open in this turn of the event loop, and
the batch commits once, at the end of the turn (`after_commit` callbacks then run, in the
order they were given). A write's all-or-none promise (an `append` with its report, a
`delete_pod`) holds inside the batch. Reads see every write made before them, the open
batch's included, so only what a client is sent needs to wait for the commit.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from capd.prices import add_usd


@dataclass(frozen=True, slots=True)
class PodRecord:
    name: str
    manifest: str
    parent: str | None
    stopped: bool
    team: str | None = None
    """§16: the team `apply` made the pod for."""
    worktree: str | None = None
    """§16: the pod's git work tree as JSON (capd.worktrees), what `delete` must undo."""
    pending_manifest: str | None = None
    """A manifest `apply` gave the pod while its turn ran, applied when the turn ends."""


StoredEvent = tuple[int, float, str, bytes]
"""(seq, ts, kind, json) of one event, as `append` takes it."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    id: int
    pod: str
    """The pod that owes the report."""
    payload: bytes
    """The report as JSON, sent as the `event` of a `pod_event` request."""


@dataclass(frozen=True, slots=True)
class OwedReport:
    """A report to commit to the outbox: the parent's socket and the report as JSON."""

    target: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Carried:
    """What a pod's deleted descendants spent, in all: tokens, and dollars (None while
    no price was known)."""

    pod: str
    tokens: int
    usd: float | None


@dataclass(frozen=True, slots=True)
class PendingRow:
    id: int
    kind: str
    """`run` (a queued run, with its turn_id) or `notify` (with its source)."""
    turn_id: str | None
    source: str | None
    """A notify's source; a queued run's `traceparent` (capd.tracing), if it had one."""
    text: str
    created: float


LAST_SEQ = 2**63 - 1
"""Past every seq: SQLite's largest integer."""
PAGE_BYTES = 4 * 1024 * 1024
"""What one page of stored events (history, replay, restore) holds at most, past its
first event."""


Compaction = tuple[int, dict[str, Any]]
"""A pod's `context_compacted`: (its seq, the event as JSON)."""


def page_of(rows: Iterable[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The rows of an `events_after` page: all of them, or fewer once they hold PAGE_BYTES
    (always at least one), so a page of large events is not read whole into memory."""
    page: list[tuple[int, bytes]] = []
    size = 0
    for row in rows:
        page.append(row)
        size += len(row[1])
        if size >= PAGE_BYTES:
            break
    return page


def start_after(found: Compaction | None) -> int:
    """`context_start` from the latest compaction before the seq asked about: its
    `restore_from`, never past that event itself; 1 without one."""
    if found is None:
        return 1
    seq, compacted = found
    return min(compacted.get("restore_from") or 1, seq)


PERMISSION_EVENTS = "kind IN ('reconfigured', 'permission_resolved')"
"""The events a restore reads its grants from, over the pod's whole history: both stores
index them apart (a partial index with this predicate), so a pod with a long history does
not scan all of it at every start."""

Totals = tuple[int, int, float | None]
"""(input tokens, output tokens, dollars or None)."""


def totals_at(found: Compaction | None) -> tuple[int, Totals]:
    """The seq after which `usage_totals` adds `assistant_message`s, and the totals as of
    the pod's latest compaction (its `usage`), or from nothing without one."""
    if found is None:
        return 0, (0, 0, None)
    seq, compacted = found
    usage = compacted.get("usage") or {}
    return seq, (
        usage.get("input_tokens") or 0,
        usage.get("output_tokens") or 0,
        usage.get("cost_usd"),
    )


def add_usages(totals: Totals, usages: Iterable[tuple[str | None]]) -> Totals:
    """`totals` plus each `assistant_message`'s `usage` (JSON text, or None), in seq order:
    the dollars are added in Python as the journal adds them, since a sum in another order
    can differ in the last bits and `capd_cost_usd_total` must not go backwards when a
    stopped pod starts."""
    inp, out, usd = totals
    for (text,) in usages:
        usage = (orjson.loads(text) if text else None) or {}
        inp += usage.get("input_tokens") or 0
        out += usage.get("output_tokens") or 0
        usd = add_usd(usd, usage.get("cost_usd"))
    return inp, out, usd


class Store(Protocol):
    # -- group commit -------------------------------------------------------------------

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once every write made so far is committed: at once when none
        waits, else after the batch commits, in the order callbacks were given."""
        ...

    async def flush(self) -> None:
        """Commit the open batch now and wait until it and every batch before it are
        committed (shutdown, and a test that reads the database from outside)."""
        ...

    def close(self) -> None: ...

    # -- pods ---------------------------------------------------------------------------

    def add_pod(
        self,
        name: str,
        manifest: str,
        parent: str | None,
        created: float,
        team: str | None = None,
        worktree: str | None = None,
    ) -> None: ...

    def pods(self) -> list[PodRecord]: ...

    def set_manifest(self, name: str, manifest: str) -> None: ...

    def set_pending_manifest(self, name: str, manifest: str | None) -> None: ...

    def set_stopped(self, name: str, stopped: bool, report: OwedReport | None = None) -> None: ...

    def delete_pod(self, name: str, socket: str, carried: Carried | None = None) -> None: ...

    def carried(self) -> list[Carried]: ...

    # -- events -------------------------------------------------------------------------

    def append(
        self,
        pod: str,
        events: list[StoredEvent],
        report: OwedReport | None = None,
        consumed: Sequence[int] = (),
        received: Sequence[str] = (),
        manifest: str | None = None,
    ) -> None: ...

    def received(self, pod: str, event_id: str) -> bool: ...

    def received_ids(self, pod: str) -> set[str]:
        """Every report id the store keeps as received by the pod (see `received`), read
        once by the journal rather than one query per report."""
        ...

    def events_after(self, pod: str, after_seq: int, limit: int) -> list[tuple[int, bytes]]: ...

    def restore_start(self, pod: str) -> int: ...

    def context_start(self, pod: str, before_seq: int) -> int: ...

    def usage_totals(self, pod: str) -> tuple[int, int, float | None]: ...

    def latest_rewound(self, pod: str, first: int, before_seq: int) -> tuple[int, bytes] | None: ...

    def turn_start_seq(self, pod: str, turn_id: str) -> int | None: ...

    def last_turns_start(self, pod: str, turns: int) -> int | None: ...

    def events_of_kind_after(
        self, pod: str, after_seq: int, *kinds: str
    ) -> list[tuple[int, bytes]]: ...

    def permission_events(self, pod: str) -> list[bytes]: ...

    # -- outbox -------------------------------------------------------------------------

    def report_targets(self) -> list[str]: ...

    def outbox_counts(self) -> tuple[int, int]: ...

    def reports_for(self, target: str, limit: int) -> list[OutboxEntry]: ...

    def report_delivered(self, report_id: int) -> None: ...

    # -- pending work -------------------------------------------------------------------

    def add_pending(
        self,
        pod: str,
        kind: str,
        text: str,
        *,
        turn_id: str | None = None,
        source: str | None = None,
    ) -> int: ...

    def pending(self, pod: str) -> list[PendingRow]: ...

    def drop_pending(self, ids: list[int]) -> None: ...

    # -- read cursors -------------------------------------------------------------------

    def read_cursor(self, reader: str, target: str) -> int: ...

    def set_read_cursor(self, reader: str, target: str, seq: int) -> None: ...
