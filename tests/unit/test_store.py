"""Both stores (SQLite and PostgreSQL): events, owed reports, pending work, read cursors and
received report ids round trip, and what must commit together commits together."""

import sqlite3
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from capd.store import SCHEMA, OwedReport, PodRecord, SqliteStore, Store, StoredEvent
from tests.unit.conftest import STORES

CONFLICT = (sqlite3.IntegrityError, psycopg.errors.UniqueViolation)
"""What a write that breaks a key raises, on each backend."""


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _events(first: int, count: int, kind: str = "status") -> list[StoredEvent]:
    return [(seq, 1.0, kind, b'{"seq":%d}' % seq) for seq in range(first, first + count)]


def test_events_page_in_seq_order_per_pod(store: Store) -> None:
    store.append("p", _events(1, 5))
    store.append("q", _events(1, 2))
    assert [seq for seq, _ in store.events_after("p", 1, 3)] == [2, 3, 4]
    assert store.events_after("p", 5, 10) == []
    assert store.events_after("q", 0, 10) == [(1, b'{"seq":1}'), (2, b'{"seq":2}')]


def test_events_of_one_kind(store: Store) -> None:
    store.append("p", _events(1, 2) + _events(3, 2, "turn_end") + _events(5, 1))
    assert [seq for seq, _ in store.events_of_kind_after("p", 3, "turn_end")] == [4]


def test_a_pods_permission_events_come_back_alone_oldest_first(store: Store) -> None:
    store.append(
        "p",
        _events(1, 2, "reconfigured")
        + _events(3, 3)
        + _events(6, 1, "permission_resolved")
        + _events(7, 1, "reconfigured"),
    )
    store.append("q", _events(1, 1, "permission_resolved"))
    assert store.permission_events("p") == [b'{"seq":%d}' % seq for seq in (1, 2, 6, 7)]


def test_a_restore_starts_where_the_latest_compaction_says(store: Store) -> None:
    def compacted(seq: int, restore_from: int) -> StoredEvent:
        return (
            seq,
            1.0,
            "context_compacted",
            b'{"seq":%d,"restore_from":%d}' % (seq, restore_from),
        )

    assert store.restore_start("p") == 1
    store.append("p", _events(1, 5))
    assert store.restore_start("p") == 1
    store.append("p", [compacted(6, 3), *_events(7, 3), compacted(10, 8), *_events(11, 2)])
    store.append("q", [compacted(1, 0)])
    assert store.restore_start("p") == 8
    assert store.restore_start("q") == 1


def test_an_append_commits_its_report_and_uses_up_its_pending_rows(store: Store) -> None:
    row = store.add_pending("p", "run", "go", turn_id="t-1")
    store.append("p", _events(1, 2), OwedReport("/parent", b'{"kind":"x"}'), [row])
    [entry] = store.reports_for("/parent", 10)
    assert (entry.pod, entry.payload) == ("p", b'{"kind":"x"}')
    assert store.pending("p") == []


def test_an_append_that_fails_keeps_its_report_and_pending_rows_out(store: Store) -> None:
    store.append("p", _events(1, 1))
    row = store.add_pending("p", "run", "go", turn_id="t-1")
    with pytest.raises(CONFLICT):  # seq 1 again
        store.append("p", _events(1, 2), OwedReport("/parent", b"{}"), [row])
    assert len(store.events_after("p", 0, 10)) == 1
    assert store.report_targets() == []
    assert [r.id for r in store.pending("p")] == [row]


def test_pending_rows_round_trip_oldest_first(store: Store) -> None:
    run = store.add_pending("p", "run", "go", turn_id="t-1")
    note = store.add_pending("p", "notify", "hi", source="ci")
    store.add_pending("q", "notify", "elsewhere", source="ci")
    rows = store.pending("p")
    assert [(r.id, r.kind, r.turn_id, r.source, r.text) for r in rows] == [
        (run, "run", "t-1", None, "go"),
        (note, "notify", None, "ci", "hi"),
    ]
    assert rows[0].created <= rows[1].created
    store.drop_pending([run])
    assert [r.id for r in store.pending("p")] == [note]


def test_owed_reports_go_out_per_parent_in_order_until_delivered(store: Store) -> None:
    for n, target in enumerate(["/a", "/b", "/a", "/a"]):
        store.append("p", _events(n + 1, 1), OwedReport(target, b"%d" % n))
    assert sorted(store.report_targets()) == ["/a", "/b"]
    first, second = store.reports_for("/a", 2)
    assert (first.payload, second.payload) == (b"0", b"2")
    store.report_delivered(first.id)
    assert [e.payload for e in store.reports_for("/a", 10)] == [b"2", b"3"]


def test_a_stop_marks_the_pod_with_the_report_it_owes(store: Store) -> None:
    store.add_pod("p", "{}", "/parent", 1.0)
    store.set_stopped("p", True, OwedReport("/parent", b"bye"))
    assert store.pods() == [PodRecord("p", "{}", "/parent", True)]
    assert [e.payload for e in store.reports_for("/parent", 10)] == [b"bye"]
    store.set_stopped("p", False)
    assert store.pods()[0].stopped is False


def test_deleting_a_pod_orphans_its_children_and_keeps_what_it_owes(store: Store) -> None:
    store.add_pod("p", "{}", "/grandparent", 1.0)
    store.add_pod("c", "{}", "/run/p.sock", 2.0)
    store.append("p", _events(1, 1), OwedReport("/grandparent", b"mine"))
    store.append("c", _events(1, 1), OwedReport("/run/p.sock", b"to p"))
    store.add_pending("p", "notify", "hi", source="x")
    store.set_read_cursor("p", "c", 1)
    store.set_read_cursor("c", "p", 1)
    store.delete_pod("p", "/run/p.sock")
    assert store.pods() == [PodRecord("c", "{}", None, False)]
    assert store.events_after("p", 0, 10) == []
    assert store.pending("p") == []
    assert store.reports_for("/run/p.sock", 10) == []
    assert [e.payload for e in store.reports_for("/grandparent", 10)] == [b"mine"]
    assert store.read_cursor("p", "c") == store.read_cursor("c", "p") == 0


def test_a_received_report_id_commits_with_its_event_and_goes_with_the_pod(store: Store) -> None:
    store.append("p", _events(1, 1, "pod_event_received"), received=["c/1"])
    with pytest.raises(CONFLICT):  # seq 1 again
        store.append("p", _events(1, 1, "pod_event_received"), received=["c/2"])
    assert store.received("p", "c/1")
    assert not store.received("p", "c/2")
    assert not store.received("q", "c/1")
    store.delete_pod("p", "/run/p.sock")
    assert not store.received("p", "c/1")


def test_a_database_from_before_received_fills_it_from_the_stored_reports(
    tmp_path: Path,
) -> None:
    def received(seq: int, event_id: bytes) -> tuple[str, int, float, str, bytes]:
        data = b'{"event":"pod_event_received","seq":%d,"payload":{"event_id":%s}}'
        return ("p", seq, 1.0, "pod_event_received", data % (seq, event_id))

    old = sqlite3.connect(tmp_path / "capd.db", isolation_level=None)
    old.executescript(SCHEMA)
    old.executemany(
        "INSERT INTO events (pod, seq, ts, kind, data) VALUES (?, ?, ?, ?, ?)",
        [
            received(1, b'"c/1"'),
            received(2, b"7"),
            ("p", 3, 1.0, "status", b'{"payload":{"event_id":"c/3"}}'),
            received(4, b'"c/4"'),
            received(5, b'"c/4"'),  # a duplicate an older capd took twice
        ],
    )
    old.close()
    store = SqliteStore(tmp_path / "capd.db")
    try:
        assert [store.received("p", i) for i in ("c/1", "7", "c/3", "c/4")] == [
            True,
            False,
            False,
            True,
        ]
        store.append("p", _events(6, 1, "pod_event_received"), received=["c/6"])
    finally:
        store.close()
    reopened = SqliteStore(tmp_path / "capd.db")
    try:
        assert reopened.received("p", "c/6")
    finally:
        reopened.close()


def test_read_cursors_start_at_zero_and_move(store: Store) -> None:
    assert store.read_cursor("p", "c") == 0
    store.set_read_cursor("p", "c", 4)
    store.set_read_cursor("p", "c", 9)
    assert store.read_cursor("p", "c") == 9


def test_what_one_store_committed_the_next_one_reads(
    store: Store, reopen: Callable[[], Store]
) -> None:
    store.add_pod("p", "{}", None, 1.0)
    store.append("p", _events(1, 3), OwedReport("/parent", b"r"))
    row = store.add_pending("p", "run", "go", turn_id="t-1")
    reopened = reopen()
    try:
        assert [r.name for r in reopened.pods()] == ["p"]
        assert len(reopened.events_after("p", 0, 10)) == 3
        assert reopened.report_targets() == ["/parent"]
        assert [r.id for r in reopened.pending("p")] == [row]
    finally:
        reopened.close()


async def test_the_writes_of_one_loop_turn_commit_together_before_their_callbacks(
    store: Store, reopen: Callable[[], Store]
) -> None:
    outside = reopen()
    try:
        seen: list[int] = []
        store.add_pod("p", "{}", None, 1.0)
        store.append("p", _events(1, 2), OwedReport("/parent", b"r"))
        row = store.add_pending("p", "notify", "hi", source="s")
        store.after_commit(lambda: seen.append(len(outside.events_after("p", 0, 10))))
        # This store reads its own open batch; another connection sees none of it yet.
        assert len(store.events_after("p", 0, 10)) == 2
        assert [r.id for r in store.pending("p")] == [row]
        assert outside.pods() == []
        # The open batch's report is not handed to the outbox before it commits.
        assert store.reports_for("/parent", 10) == []
        await store.flush()
        assert seen == [2]
        assert [e.payload for e in store.reports_for("/parent", 10)] == [b"r"]
        assert [r.id for r in outside.pending("p")] == [row]
    finally:
        outside.close()


def test_free_text_with_a_nul_round_trips(store: Store) -> None:
    """A client's text may hold any character JSON can carry, NUL included."""
    text = "a\x00b \U0001f600 é"
    store.add_pending("p", "run", text, turn_id="t\x00", source="s\x00")
    [row] = store.pending("p")
    assert (row.text, row.turn_id, row.source) == (text, "t\x00", "s\x00")
    store.append("p", _events(1, 1, "pod_event_received"), received=["c\x00/1"])
    assert store.received("p", "c\x00/1")


async def test_writes_in_one_batch_apply_in_the_order_they_were_made(
    store: Store, reopen: Callable[[], Store]
) -> None:
    store.add_pod("p", "{}", None, 1.0)
    for seq in range(1, 4):
        store.append("p", _events(seq, 1))
    store.delete_pod("p", "/run/p.sock")
    store.append("p", _events(1, 1, "again"))
    store.append("q", _events(1, 1))
    assert [kind for kind in ("again",) if store.events_of_kind_after("p", 0, kind)] == ["again"]
    await store.flush()
    reopened = reopen()
    try:
        assert reopened.events_after("p", 0, 10) == [(1, b'{"seq":1}')]
        assert len(reopened.events_after("q", 0, 10)) == 1
        assert reopened.pods() == []
    finally:
        reopened.close()
