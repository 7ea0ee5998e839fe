"""The journal: a durable event is committed, then takes its seq, then is broadcast as the
bytes stored; the report it owes the parent commits with it."""

import sqlite3
from pathlib import Path

import orjson
import pytest

from capd.engines.base import Turn
from capd.journal import Journal
from capd.permissions import Grants
from capd.store import Store
from protocol.events import (
    Ack,
    AssistantMessage,
    PermissionGrant,
    PermissionResolved,
    PodEventReceived,
    Reconfigured,
    StatusChanged,
    TextDelta,
    TurnStart,
    Usage,
    UserMessage,
)
from protocol.reports import ShutDown
from protocol.results import HistoryResult
from tests.unit.outlet import FakeOutlet, flushed
from tests.unit.pods import PARENT, RecordingOutbox


def _journal(store: Store, parent: str | None = None) -> tuple[Journal, RecordingOutbox]:
    outbox = RecordingOutbox(store)
    return Journal("p", parent, store, outbox), outbox


async def test_subscribers_get_exactly_the_bytes_the_store_holds(store: Store) -> None:
    journal, _ = _journal(store)
    outlet = FakeOutlet()
    journal.hub.subscribe(outlet, None)
    event = StatusChanged(status="running", turn_id="t-1")
    journal.emit(event, None)
    assert (event.pod, event.seq, journal.last_seq) == ("p", 1, 1)
    await store.flush()
    [(seq, stored)] = store.events_after("p", 0, 10)
    assert seq == 1
    assert (await flushed(outlet)).written == stored + b"\n"


async def test_an_event_reaches_no_one_before_it_commits(store: Store, tmp_path: Path) -> None:
    """A subscriber, a replay and a history page see an event only once another
    connection to the database finds it there: none of them waits on a crash."""
    journal, outbox = _journal(store, PARENT)
    outside = sqlite3.connect(tmp_path / "capd.db")
    seen_outside: list[int] = []
    outlet = FakeOutlet()
    outlet.on_offer = lambda: seen_outside.append(_stored(outside))
    journal.hub.subscribe(outlet, None)
    journal.emit(StatusChanged(status="idle"), None, report=ShutDown(pod="p", event_id="p/1"))
    journal.emit_ephemeral(TextDelta(turn_id="t", text="after"))
    assert journal.last_seq == 1
    assert journal.hub.last_seq() == 0
    assert journal.page(0, 10) == []
    assert outbox.poked == []
    assert HistoryResult.model_validate(orjson.loads(journal.history("h", 0, 10))["result"]) == (
        HistoryResult(events=[], last_seq=0)
    )
    assert (await flushed(outlet)).written == b""
    assert _stored(outside) == 0
    await store.flush()
    assert seen_outside == [1, 1]
    assert outbox.poked == [PARENT]
    assert [f["event"] for f in (await flushed(outlet)).frames()] == ["status", "text_delta"]
    assert [seq for seq, _ in journal.page(0, 10)] == [1]
    outside.close()


def _stored(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COUNT(*) FROM events").fetchone()[0]


def test_events_emitted_together_take_consecutive_seqs_and_one_time(store: Store) -> None:
    journal, _ = _journal(store)
    journal.emit(StatusChanged(status="idle"), None)
    events = [TurnStart(turn_id="t", invoke="run"), UserMessage(turn_id="t", text="hi")]
    journal.emit_all(list(events), None)
    assert [e.seq for e in events] == [2, 3]
    assert events[0].ts == events[1].ts
    assert journal.context.seqs == [3]


async def test_an_event_that_cannot_commit_takes_no_seq_and_reaches_no_one(
    store: Store,
) -> None:
    journal, _ = _journal(store)
    outlet = FakeOutlet()
    journal.hub.subscribe(outlet, None)
    store.close()
    with pytest.raises(sqlite3.ProgrammingError):
        journal.emit(UserMessage(turn_id="t", text="lost"), None)
    assert journal.last_seq == 0
    assert journal.context.messages == []
    assert (await flushed(outlet)).written == b""


def test_a_report_commits_with_its_event_and_wakes_the_outbox(store: Store) -> None:
    journal, outbox = _journal(store, PARENT)
    report = ShutDown(pod="p", event_id="p/1")
    journal.emit(StatusChanged(status="idle"), None, report=report)
    [entry] = store.reports_for(PARENT, 10)
    assert orjson.loads(entry.payload) == report.model_dump()
    assert outbox.poked == [PARENT]


def test_a_pod_without_a_parent_owes_no_report(store: Store) -> None:
    journal, outbox = _journal(store)
    journal.emit(StatusChanged(status="idle"), None, report=ShutDown(pod="p", event_id="p/1"))
    assert store.report_targets() == []
    assert outbox.poked == []
    assert journal.shut_down_report() is None


def test_an_event_commits_with_the_deletion_of_the_pending_rows_it_uses_up(
    store: Store,
) -> None:
    journal, _ = _journal(store)
    used, kept = (store.add_pending("p", "notify", t, source="s") for t in ("a", "b"))
    journal.emit(UserMessage(turn_id="t", text="a"), None, consumed=[used])
    assert [row.id for row in store.pending("p")] == [kept]


async def test_ephemeral_events_reach_subscribers_without_a_seq(store: Store) -> None:
    journal, _ = _journal(store)
    journal.emit_ephemeral(TextDelta(turn_id="t", text="unseen"))  # nobody listens
    outlet = FakeOutlet()
    journal.hub.subscribe(outlet, None)
    journal.emit_ephemeral(TextDelta(turn_id="t", text="seen"))
    [frame] = (await flushed(outlet)).frames()
    assert (frame["event"], frame["pod"], frame["text"]) == ("text_delta", "p", "seen")
    assert "seq" not in frame
    assert journal.last_seq == 0
    assert store.events_after("p", 0, 10) == []


def test_history_pages_the_stored_events(store: Store) -> None:
    journal, _ = _journal(store)
    for status in ("running", "paused", "running", "idle"):
        journal.emit(StatusChanged(status=status), None)
    ack = Ack.model_validate_json(journal.history("h", 1, 2))
    page = HistoryResult.model_validate(ack.result)
    assert ack.id == "h"
    assert [e["seq"] for e in page.events] == [2, 3]
    assert page.last_seq == 4
    # The stored bytes, spliced in as they were broadcast.
    assert [orjson.dumps(e) for e in page.events] == [d for _, d in store.events_after("p", 1, 2)]


def test_a_page_of_large_events_stops_at_its_byte_bound(store: Store) -> None:
    """10,000 events of 1 MiB would have been read whole (10 GiB) for one history page."""
    journal, _ = _journal(store)
    for n in range(6):
        journal.emit(PodEventReceived(payload={"kind": "x", "n": n, "d": "x" * 1_000_000}), None)
    page = store.events_after("p", 0, 10_000)
    assert [seq for seq, _ in page] == [1, 2, 3, 4, 5]  # the fifth passes PAGE_BYTES (4 MiB)
    assert [seq for seq, _ in store.events_after("p", 5, 10_000)] == [6]


def test_the_usage_of_a_step_a_pause_cut_short_counts_live_as_after_a_restart(
    store: Store,
) -> None:
    journal, _ = _journal(store)
    turn = Turn("t", "run")
    cut = AssistantMessage(
        turn_id="t", text="half", interrupted=True, usage=Usage(input_tokens=7, cost_usd=0.5)
    )
    whole = AssistantMessage(turn_id="t", text="all", usage=Usage(input_tokens=9, output_tokens=2))
    journal.emit_all([TurnStart(turn_id="t", invoke="run"), cut, whole], turn)
    restored, _ = _journal(store)
    restored.restore(data for _, data in store.events_after("p", 0, 10))
    expected = Usage(input_tokens=16, output_tokens=2, cost_usd=0.5)
    assert journal.usage == restored.usage == expected
    assert store.usage_totals("p") == (16, 2, 0.5)
    assert turn.output == "halfall"


def test_new_permissions_drop_the_grants_live_and_for_a_restore_past_a_compaction(
    store: Store,
) -> None:
    """Grants name rules by index; a `reconfigured` of `permissions` commits with the new
    manifest and drops them, and a restore that reads only later events (as after a
    compaction) does not read them back."""
    store.add_pod("p", "old", None, 0.0)
    journal, _ = _journal(store)

    def granted(request_id: str, rule: int | None, tool: str) -> PermissionResolved:
        grant = PermissionGrant(rule=rule, tool=tool)
        return PermissionResolved(turn_id="t", request_id=request_id, grant=grant)

    journal.emit(granted("r1", 0, "bash"), None)
    journal.emit_all([Reconfigured(changed=["system_prompt"])], None, manifest="kept")
    assert journal.grants == Grants(rules={0})
    journal.emit_all([Reconfigured(changed=["permissions"])], None, manifest="new")
    assert journal.grants == Grants()
    journal.emit(granted("r2", None, "read_file"), None)
    assert [record.manifest for record in store.pods()] == ["new"]
    restored, _ = _journal(store)
    restored.restore(data for _, data in store.events_after("p", journal.last_seq - 1, 10))
    assert restored.grants == Grants(tools={"read_file"})
