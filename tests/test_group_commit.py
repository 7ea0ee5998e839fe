"""Group commit and pipelined requests, end to end (issue 22): a burst of requests on one
connection is acked in order and stored once; no client hears of an event before it is
committed; a crash loses nothing acked; a commit that fails stops capd, and a restart
restores what committed."""

import asyncio
import contextlib
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from capd.store.batch import EXIT_STORE_FAILED
from protocol.client import Client
from tests.conftest import CapdProcess
from tests.helpers import connect_pod, full_history, scripted, sigkill, spawn

pytestmark = pytest.mark.shared_capd

BURST = 1000
WAIT_S = 30.0
SLOW_STEP = {"text": "x" * 10_000, "chunk_chars": 1, "delay_ms": 10}
"""A turn that runs long enough to be paused: reports then wait as notes, starting no turn."""


def _report(i: int, filler: str = "") -> dict[str, Any]:
    return {"event": "turn_ended", "pod": "child", "event_id": f"r-{i}", "output": filler}


def _burst(first: int, count: int, filler: str = "") -> bytes:
    return b"".join(
        orjson.dumps({"id": i, "method": "pod_event", "event": _report(i, filler)}) + b"\n"
        for i in range(first, first + count)
    )


async def _paused_inbox(capd: CapdProcess) -> None:
    await spawn(capd, "inbox", scripted(SLOW_STEP))
    async with await connect_pod(capd, "inbox", subscribe=False) as pod:
        await pod.request({"method": "run", "text": "wait"})
        await pod.request({"method": "pause"})


@contextlib.asynccontextmanager
async def _raw(path: Path) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection that writes requests as they are and reads replies line by line."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
    try:
        await reader.readline()  # hello
        yield reader, writer
    finally:
        writer.close()


async def _received_ids(capd: CapdProcess) -> list[str]:
    async with await connect_pod(capd, "inbox", subscribe=False) as pod:
        history = await full_history(pod)
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    return [e["payload"]["event_id"] for e in history if e["event"] == "pod_event_received"]


@pytest.mark.own_capd
async def test_a_pipelined_burst_is_acked_in_order_committed_first_and_stored_once(
    capd: CapdProcess,
) -> None:
    await _paused_inbox(capd)
    db = sqlite3.connect(capd.state_dir / "capd.db")
    subscriber = await connect_pod(capd, "inbox")
    async with _raw(capd.pod_socket("inbox")) as (reader, writer):
        writer.write(_burst(0, BURST))
        async with asyncio.timeout(WAIT_S):
            replies = [orjson.loads(await reader.readline()) for _ in range(BURST)]
    assert [(r["event"], r["id"]) for r in replies] == [("ack", i) for i in range(BURST)]
    heard = 0
    async with asyncio.timeout(WAIT_S):
        while heard < BURST:
            event = await subscriber.next_event()
            if event["event"] != "pod_event_received":
                continue
            heard += 1
            stored = "SELECT 1 FROM events WHERE pod = 'inbox' AND seq = ?"
            assert db.execute(stored, (event["seq"],)).fetchone(), f"seq {event['seq']} unstored"
    await subscriber.close()
    db.close()

    capd.stop()
    await asyncio.to_thread(capd.start)
    assert await _received_ids(capd) == [f"r-{i}" for i in range(BURST)]
    async with _raw(capd.pod_socket("inbox")) as (reader, writer):
        writer.write(_burst(0, 10))
        async with asyncio.timeout(WAIT_S):
            again = [orjson.loads(await reader.readline()) for _ in range(10)]
    assert all(r["result"] == {"duplicate": True} for r in again)


@pytest.mark.own_capd
async def test_each_report_of_a_burst_is_answered_as_if_alone_a_repeat_within_it_too(
    capd: CapdProcess,
) -> None:
    """The pod serves a burst of reports as one (one group of events), answering each as
    it would alone: an event_id already in the burst is a duplicate; a non-string one
    never is."""
    await _paused_inbox(capd)
    ids: list[object] = ["a", "b", "a", 7, "c", "b", 7]
    frames = b"".join(
        orjson.dumps({"id": i, "method": "pod_event", "event": {"event": "x", "event_id": e}})
        + b"\n"
        for i, e in enumerate(ids)
    )
    async with _raw(capd.pod_socket("inbox")) as (reader, writer):
        writer.write(frames)
        async with asyncio.timeout(WAIT_S):
            replies = [orjson.loads(await reader.readline()) for _ in ids]
    answers = [r["result"].get("buffered", r["result"].get("duplicate")) for r in replies]
    assert answers == [1, 2, True, 3, 4, True, 5]
    assert await _received_ids(capd) == ["a", "b", 7, "c", 7]


@pytest.mark.own_capd
async def test_sigkill_mid_burst_keeps_every_event_a_client_saw_acked(capd: CapdProcess) -> None:
    await _paused_inbox(capd)
    acked: list[int] = []
    async with _raw(capd.pod_socket("inbox")) as (reader, writer):
        writer.write(_burst(0, BURST * 3))
        async with asyncio.timeout(WAIT_S):
            while len(acked) < BURST:
                acked.append(orjson.loads(await reader.readline())["id"])
        await sigkill(capd)
    await asyncio.to_thread(capd.start)
    stored = await _received_ids(capd)
    assert len(set(stored)) == len(stored), "a report was stored twice"
    assert stored[: len(acked)] == [f"r-{i}" for i in acked]


@contextlib.contextmanager
def _small_disk(path: Path) -> Iterator[None]:
    """A 32 MiB tmpfs at `path`, a real disk to fill. Skips where mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 65536)


async def test_a_commit_that_fails_stops_capd_unacked_and_a_restart_keeps_what_committed(
    capd_dirs: CapdProcess,
) -> None:
    capd = capd_dirs
    with _small_disk(capd.state_dir):
        capd.start()
        await _paused_inbox(capd)
        async with _raw(capd.pod_socket("inbox")) as (reader, writer):
            writer.write(_burst(0, 10))
            async with asyncio.timeout(WAIT_S):
                for _ in range(10):
                    assert orjson.loads(await reader.readline())["event"] == "ack"
            _fill(capd.state_dir / "filler")
            # Large enough that the write-ahead log must grow on the full disk.
            writer.write(_burst(10, 1, "x" * 600_000))
            async with asyncio.timeout(WAIT_S):
                assert await reader.readline() == b"", "a reply came for a lost write"
        assert capd.proc is not None
        assert await asyncio.to_thread(capd.proc.wait, WAIT_S) == EXIT_STORE_FAILED
        assert "store commit failed" in capd.output()
        (capd.state_dir / "filler").unlink()
        await asyncio.to_thread(capd.start)
        assert await _received_ids(capd) == [f"r-{i}" for i in range(10)]
        capd.stop()


async def test_a_spawn_is_listed_by_the_next_request_on_its_connection(
    capd: CapdProcess,
) -> None:
    """Daemon methods stay sequential: a `list` sent right behind a `spawn` sees the pod."""
    manifest = {"name": "next", "model": scripted()}
    async with _raw(capd.socket) as (reader, writer):
        requests = [
            {"id": 1, "method": "spawn", "manifest": manifest},
            {"id": 2, "method": "list"},
        ]
        writer.write(b"".join(orjson.dumps(r) + b"\n" for r in requests))
        async with asyncio.timeout(WAIT_S):
            spawned, listed = [orjson.loads(await reader.readline()) for _ in range(2)]
    assert (spawned["id"], listed["id"]) == (1, 2)
    assert "next" in [p["name"] for p in listed["result"]["pods"]]
    async with await Client.connect(capd.socket) as daemon:
        await daemon.request({"method": "delete", "name": "next"})


async def test_a_status_behind_unanswered_requests_sees_what_they_did(capd: CapdProcess) -> None:
    await _paused_inbox(capd)
    async with await connect_pod(capd, "inbox", subscribe=False) as pod:
        before = (await pod.request({"method": "status"}))["last_seq"]
    async with _raw(capd.pod_socket("inbox")) as (reader, writer):
        status = orjson.dumps({"id": "s", "method": "status"}) + b"\n"
        writer.write(_burst(0, 50) + status)
        async with asyncio.timeout(WAIT_S):
            replies = [orjson.loads(await reader.readline()) for _ in range(51)]
    assert [r["id"] for r in replies] == [*range(50), "s"]
    assert replies[-1]["result"]["last_seq"] == before + 50


@pytest.mark.parametrize(
    ("frame", "reply"),
    [
        ({"id": 7, "method": "status"}, ("ack", 7)),
        ({"method": "status"}, ("ack", None)),
        ({"id": True, "method": "status"}, ("error", None)),
        ({"id": 1.5, "method": "status"}, ("error", None)),
        ({"id": "x", "method": "status", "extra": 1}, ("error", "x")),
    ],
)
async def test_a_status_is_checked_as_strictly_as_any_request(
    capd: CapdProcess, frame: dict[str, Any], reply: tuple[str, object]
) -> None:
    await spawn(capd, "w", scripted())
    async with _raw(capd.pod_socket("w")) as (reader, writer):
        writer.write(orjson.dumps(frame) + b"\n")
        async with asyncio.timeout(WAIT_S):
            got = orjson.loads(await reader.readline())
    assert (got["event"], got["id"]) == reply
    if got["event"] == "error":
        assert got["code"] == "invalid_request"


async def test_a_pause_sent_with_the_end_of_input_is_answered(capd: CapdProcess) -> None:
    """The pause's ack comes only once the turn's task has stopped, after capd has read
    the end of the client's input."""
    await spawn(capd, "w", scripted(SLOW_STEP))
    async with await connect_pod(capd, "w", subscribe=False) as pod:
        await pod.request({"method": "run", "text": "go"})
    async with _raw(capd.pod_socket("w")) as (reader, writer):
        writer.write(b'{"id":1,"method":"pause"}\n')
        writer.write_eof()
        async with asyncio.timeout(WAIT_S):
            replies = [orjson.loads(line) async for line in reader]
    assert [(r["event"], r["id"]) for r in replies] == [("ack", 1)]


async def test_a_stopped_pods_subscribers_hear_its_last_events(capd: CapdProcess) -> None:
    await spawn(capd, "w", scripted(SLOW_STEP))
    async with await connect_pod(capd, "w") as pod:
        await pod.request({"method": "run", "text": "go"})
        async with await Client.connect(capd.socket) as daemon:
            await daemon.request({"method": "stop", "name": "w"})
        heard = []
        async with asyncio.timeout(WAIT_S):
            while not heard or heard[-1] != ("status", "idle"):
                event = await pod.next_event()
                if "seq" in event:
                    heard.append((event["event"], event.get("status") or event.get("result")))
    assert ("turn_end", "cancelled") in heard
