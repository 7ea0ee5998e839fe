"""Edges of group commit and pipelined requests (issue 22 review): a client hears of a
pod's stop only once it is committed, and a shutdown answers every request a pipelining
connection had handed on, handling none it cannot answer."""

import asyncio
import signal
from typing import Any

import orjson
import psycopg
import pytest

from tests.conftest import CapdProcess
from tests.helpers import connect_pod, full_history, scripted, spawn

WAIT_S = 30.0
PAUSED_STEP = {"text": "x" * 10_000, "chunk_chars": 1, "delay_ms": 10}
"""A turn long enough to be paused: reports then wait as notes, starting no turn."""


def _cut_store_connection(url: str) -> None:
    """End capd's PostgreSQL store session (`capd/<node>/<incarnation>`, not the fleet's
    `capd/<node>/control`) from the server's side: its next commit fails, and capd stops
    (exit 75) with nothing of that batch sent to anyone."""
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE 'capd/%' AND application_name NOT LIKE '%/control'"
        ).fetchone()
    assert row == (1,)


async def _frames_until_closed(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    async with asyncio.timeout(WAIT_S):
        return [orjson.loads(line) async for line in reader]


@pytest.mark.parametrize("capd_store", ["postgresql"], indirect=True)
async def test_a_pod_stop_that_never_committed_is_heard_by_no_subscriber(
    capd: CapdProcess,
) -> None:
    await spawn(capd, "w", scripted())
    followers, writers = [], []  # each writer kept: a writer collected closes its socket
    for request in (
        b'{"id":1,"pod":"w","method":"subscribe"}\n',
        b'{"id":1,"method":"subscribe"}\n',
    ):
        reader, writer = await asyncio.open_unix_connection(str(capd.socket))
        await reader.readline()  # hello
        writer.write(request)
        assert orjson.loads(await reader.readline())["event"] == "ack"
        followers.append(reader)
        writers.append(writer)
    assert capd.store is not None
    _cut_store_connection(capd.store)
    reader, writer = await asyncio.open_unix_connection(str(capd.socket))
    writer.write(b'{"id":1,"method":"stop","name":"w"}\n')
    assert [f["event"] for f in await _frames_until_closed(reader)] == ["hello"]
    # The pod's follower on the daemon socket, and the daemon's subscriber.
    for follower in followers:
        assert await _frames_until_closed(follower) == []
    assert capd.proc is not None
    assert await asyncio.to_thread(capd.proc.wait, WAIT_S) == 75


async def test_a_shutdown_answers_every_request_it_handled_and_handles_no_other(
    capd: CapdProcess,
) -> None:
    await spawn(capd, "w", scripted(PAUSED_STEP))
    async with await connect_pod(capd, "w", subscribe=False) as pod:
        await pod.request({"method": "run", "text": "wait"})
        await pod.request({"method": "pause"})
    reader, writer = await asyncio.open_unix_connection(str(capd.socket), limit=1 << 24)
    await reader.readline()  # hello
    burst = [
        {
            "id": i,
            "pod": "w",
            "method": "pod_event",
            "event": {"event": "turn_ended", "pod": "c", "event_id": f"r-{i}", "output": ""},
        }
        for i in range(3000)
    ]
    writer.write(b"".join(orjson.dumps(request) + b"\n" for request in burst))
    await writer.drain()
    assert orjson.loads(await reader.readline())["id"] == 0  # capd is handling the burst
    capd.signal(signal.SIGTERM)
    acked = [0] + [frame["id"] for frame in await _frames_until_closed(reader)]
    assert capd.proc is not None
    assert await asyncio.to_thread(capd.proc.wait, WAIT_S) == 0
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "w", subscribe=False) as pod:
        history = await full_history(pod)
    stored = [e["payload"]["event_id"] for e in history if e["event"] == "pod_event_received"]
    # Each request handled (its report stored) was acked before the connection closed;
    # the requests still buffered when the shutdown began were not handled.
    assert stored == [f"r-{i}" for i in acked]
    assert acked == list(range(len(acked)))
