"""Report delivery to a parent socket: a real Unix socket server in-process plays the
parent, and the back-off's waits are recorded and made short."""

import asyncio
import contextlib
import itertools
import shutil
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from capd import backoff, outbox
from capd.outbox import Outbox
from capd.store import OwedReport, Store
from tests.fakes.engine import WAIT_S


class Parent:
    """A parent's socket: takes `pod_event` requests and answers each as `replies` says
    ("ack" when it is empty, "hang_up", or an error code)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.got: list[str] = []
        """The event_id of each report received, in arrival order, repeats included."""
        self.replies: deque[str] = deque()
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def received(self, count: int) -> list[str]:
        async with asyncio.timeout(WAIT_S):
            while len(self.got) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.got

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"event":"hello","protocol":1,"server":"parent"}\n')
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                request = orjson.loads(line)
                self.got.append(request["event"]["event_id"])
                self._arrived.set()
                reply = self.replies.popleft() if self.replies else "ack"
                if reply == "hang_up":
                    break
                answer = {"event": "ack", "id": request["id"], "result": {}}
                if reply != "ack":
                    answer = {"event": "error", "id": request["id"], "code": reply, "message": "no"}
                writer.write(orjson.dumps(answer) + b"\n")
                await writer.drain()
        writer.close()


class Deliveries:
    """The store's side: reports the outbox marked delivered (or dropped), by outbox id."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids: list[int] = []
        self._changed = asyncio.Event()
        mark = store.report_delivered

        def marked(report_id: int) -> None:
            mark(report_id)
            self.ids.append(report_id)
            self._changed.set()

        monkeypatch.setattr(store, "report_delivered", marked)

    async def count(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.ids) < count:
                self._changed.clear()
                await self._changed.wait()


class BackOffs:
    """Stands in for `backoff_s` in the outbox: records each attempt and waits `wait_s`."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.attempts: list[int] = []
        self._changed = asyncio.Event()

    def __call__(self, attempt: int, base_s: float) -> float:
        assert base_s == outbox.RETRY_BASE_S
        self.attempts.append(attempt)
        self._changed.set()
        return self.wait_s

    async def count(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while len(self.attempts) < count:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """Short: a Unix socket path holds at most 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="capd-unit-", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
async def parent(sock_dir: Path) -> AsyncIterator[Parent]:
    """A parent not yet listening."""
    parent = Parent(sock_dir / "parent.sock")
    yield parent
    await parent.stop()


@pytest.fixture
async def reports(store: Store) -> AsyncIterator[Outbox]:
    delivering = Outbox(store)
    yield delivering
    await delivering.close()


@pytest.fixture
def deliveries(store: Store, monkeypatch: pytest.MonkeyPatch) -> Deliveries:
    return Deliveries(store, monkeypatch)


def _back_offs(monkeypatch: pytest.MonkeyPatch, wait_s: float) -> BackOffs:
    waits = BackOffs(wait_s)
    monkeypatch.setattr(outbox, "backoff_s", waits)
    return waits


_seqs = itertools.count(1)


def _owe(store: Store, target: Path, *event_ids: str) -> None:
    """Commit one event per report, each owing `target` that report, as a pod's journal does."""
    for event_id in event_ids:
        payload = orjson.dumps({"kind": "x", "pod": "p", "event_id": event_id})
        store.append("p", [(next(_seqs), 0.0, "status", b"{}")], OwedReport(str(target), payload))


async def test_reports_go_to_the_parent_oldest_first_and_leave_the_store(
    store: Store, parent: Parent, reports: Outbox, deliveries: Deliveries
) -> None:
    await parent.start()
    _owe(store, parent.path, "p/1", "p/2", "p/3")
    reports.poke(str(parent.path))
    assert await parent.received(3) == ["p/1", "p/2", "p/3"]
    await deliveries.count(3)
    assert store.reports_for(str(parent.path), 10) == []


async def test_an_absent_parent_is_retried_with_growing_waits_until_it_listens(
    store: Store,
    parent: Parent,
    reports: Outbox,
    deliveries: Deliveries,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits = _back_offs(monkeypatch, 0.001)
    _owe(store, parent.path, "p/1")
    reports.poke(str(parent.path))
    await waits.count(3)
    await parent.start()
    assert await parent.received(1) == ["p/1"]
    await deliveries.count(1)
    assert waits.attempts == list(range(1, len(waits.attempts) + 1))


async def test_retry_now_and_a_new_report_cut_a_back_off_short(
    store: Store,
    parent: Parent,
    reports: Outbox,
    deliveries: Deliveries,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits = _back_offs(monkeypatch, 60.0)
    _owe(store, parent.path, "p/1")
    reports.poke(str(parent.path))
    await waits.count(1)
    reports.retry_now(str(parent.path))  # still absent: the next attempt fails at once
    await waits.count(2)
    await parent.start()
    _owe(store, parent.path, "p/2")
    reports.poke(str(parent.path))
    assert await parent.received(2) == ["p/1", "p/2"]
    await deliveries.count(2)
    assert waits.attempts == [1, 2]


async def test_an_absent_parent_holds_up_no_other(
    store: Store, sock_dir: Path, parent: Parent, reports: Outbox, deliveries: Deliveries
) -> None:
    await parent.start()
    _owe(store, sock_dir / "gone.sock", "p/1")
    _owe(store, parent.path, "p/2")
    reports.poke(str(sock_dir / "gone.sock"))
    reports.poke(str(parent.path))
    assert await parent.received(1) == ["p/2"]
    await deliveries.count(1)
    assert len(store.reports_for(str(sock_dir / "gone.sock"), 10)) == 1


async def test_a_report_refused_as_malformed_is_dropped_and_the_rest_go(
    store: Store,
    parent: Parent,
    reports: Outbox,
    deliveries: Deliveries,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await parent.start()
    parent.replies.extend(["invalid_request"])
    _owe(store, parent.path, "p/1", "p/2")
    reports.poke(str(parent.path))
    assert await parent.received(2) == ["p/1", "p/2"]
    await deliveries.count(2)
    assert store.reports_for(str(parent.path), 10) == []
    assert any("refused a report" in r.message and "p/1" in r.message for r in caplog.records)


async def test_a_frame_too_large_drops_the_report_and_reconnects_for_the_rest(
    store: Store, parent: Parent, reports: Outbox, deliveries: Deliveries
) -> None:
    await parent.start()
    parent.replies.extend(["frame_too_large"])
    _owe(store, parent.path, "p/1", "p/2")
    reports.poke(str(parent.path))
    assert await parent.received(2) == ["p/1", "p/2"]
    await deliveries.count(2)


@pytest.mark.parametrize("reply", ["shutting_down", "hang_up"])
async def test_a_report_the_parent_did_not_ack_is_sent_again_with_its_event_id(
    store: Store,
    parent: Parent,
    reports: Outbox,
    deliveries: Deliveries,
    monkeypatch: pytest.MonkeyPatch,
    reply: str,
) -> None:
    waits = _back_offs(monkeypatch, 0.001)
    await parent.start()
    parent.replies.append(reply)
    _owe(store, parent.path, "p/1", "p/2")
    reports.poke(str(parent.path))
    assert await parent.received(3) == ["p/1", "p/1", "p/2"]
    await deliveries.count(2)
    assert waits.attempts == [1]


async def test_start_resumes_what_an_earlier_run_left_undelivered(
    store: Store, parent: Parent, reports: Outbox, deliveries: Deliveries
) -> None:
    _owe(store, parent.path, "p/1")
    await parent.start()
    reports.start()
    assert await parent.received(1) == ["p/1"]
    await deliveries.count(1)


async def test_close_stops_delivering_and_keeps_what_is_owed(
    store: Store, parent: Parent, reports: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits = _back_offs(monkeypatch, 60.0)
    _owe(store, parent.path, "p/1")
    reports.poke(str(parent.path))
    await waits.count(1)
    async with asyncio.timeout(WAIT_S):
        await reports.close()
    await parent.start()
    reports.poke(str(parent.path))  # closed: no new worker
    assert len(store.reports_for(str(parent.path), 10)) == 1
    assert parent.got == []


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 0.1, 0.125), (2, 0.2, 0.25), (4, 0.8, 1.0), (9, 25.6, 32.0), (10, 30.0, 37.5)],
)
def test_back_off_doubles_from_its_base_up_to_the_cap_with_jitter_above(
    monkeypatch: pytest.MonkeyPatch, attempt: int, low: float, high: float
) -> None:
    monkeypatch.setattr(backoff.random, "uniform", lambda a, b: a)
    assert backoff.backoff_s(attempt, 0.1) == pytest.approx(low)
    monkeypatch.setattr(backoff.random, "uniform", lambda a, b: b)
    assert backoff.backoff_s(attempt, 0.1) == pytest.approx(high)
