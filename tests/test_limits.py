"""Limits with clear errors, and a subscriber that never reads (issue 5)."""

import asyncio

import pytest

from protocol.client import Client
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import (
    connect_pod,
    daemon_request,
    is_event,
    rss_bytes,
    scripted,
    spawn,
    wait_for,
)


async def test_max_pods_counts_the_pods_that_are_up(capd_dirs: CapdProcess) -> None:
    capd_dirs.extra_args = ["--max-pods", "2"]
    await asyncio.to_thread(capd_dirs.start)
    await spawn(capd_dirs, "a", scripted())
    await spawn(capd_dirs, "b", scripted())
    with pytest.raises(ProtocolError) as full:
        await spawn(capd_dirs, "c", scripted())
    assert full.value.code == "limit_reached"
    assert "the most --max-pods=2 allows" in full.value.message
    await daemon_request(capd_dirs, {"method": "stop", "name": "a"})
    await spawn(capd_dirs, "c", scripted())
    with pytest.raises(ProtocolError) as again:
        await daemon_request(capd_dirs, {"method": "start", "name": "a"})
    assert again.value.code == "limit_reached"


async def test_max_subscribers_per_pod(capd_dirs: CapdProcess) -> None:
    capd_dirs.extra_args = ["--max-subscribers", "2"]
    await asyncio.to_thread(capd_dirs.start)
    await spawn(capd_dirs, "w1", scripted())
    first = await connect_pod(capd_dirs, "w1")
    second = await connect_pod(capd_dirs, "w1")
    async with first, second, await connect_pod(capd_dirs, "w1", subscribe=False) as third:
        with pytest.raises(ProtocolError) as full:
            await third.request({"method": "subscribe"})
        assert full.value.code == "limit_reached"
        assert "--max-subscribers=2" in full.value.message
        await second.request({"method": "subscribe"})  # re-subscribing keeps its place
        await first.request({"method": "unsubscribe"})
        await third.request({"method": "subscribe"})
        await second.request({"method": "run", "text": "hi"})
        end, _ = await wait_for(third, is_event("turn_end"))
    assert end["output"] == "You said: hi"


async def test_max_subscribers_counts_both_kinds_of_daemon_subscriber(
    capd_dirs: CapdProcess,
) -> None:
    capd_dirs.extra_args = ["--max-subscribers", "2"]
    await asyncio.to_thread(capd_dirs.start)
    plain, activity, third = [await Client.connect(capd_dirs.socket) for _ in range(3)]
    async with plain, activity, third:
        await plain.request({"method": "subscribe"})
        await activity.request({"method": "subscribe", "activity": True})
        for request in ({"method": "subscribe"}, {"method": "subscribe", "activity": True}):
            with pytest.raises(ProtocolError) as full:
                await third.request(request)
            assert full.value.code == "limit_reached"
        await activity.request({"method": "subscribe"})  # switching kinds keeps its place
        await plain.request({"method": "subscribe", "activity": True})


QUEUED_BYTES = 3 * 2**19
"""--max-queued-bytes of the stuck subscriber test."""


async def _stream_turn(socket_path: str, pid: int, expected: int) -> tuple[int, int]:
    """Run a turn and read its deltas as fast as possible (raw lines, no JSON parsing, so
    the reader is never the bottleneck); returns capd's peak RSS meanwhile, and how many
    bytes the deltas' frames took."""
    reader, writer = await asyncio.open_unix_connection(socket_path, limit=2**20)
    writer.write(b'{"method": "subscribe", "id": 1}\n{"method": "run", "text": "go", "id": 2}\n')
    peak, received, streamed = rss_bytes(pid), 0, 0
    try:
        async with asyncio.timeout(60):
            while b'"turn_end"' not in (line := await reader.readline()):
                assert b'"lagged"' not in line
                if b'"text_delta"' in line:
                    received += 1
                    streamed += len(line)
                    if received % 2000 == 0:
                        peak = max(peak, rss_bytes(pid))
    finally:
        writer.close()
    assert received == expected
    return peak, streamed


async def test_a_subscriber_that_never_reads_leaves_memory_bounded(
    capd_dirs: CapdProcess,
) -> None:
    """The same 40k-delta turn twice: alone, then with a subscriber that never reads.
    The stuck one may cost about its 1.5 MiB queue (1.5 MiB, so the reader never lags; the
    turn's deltas take twice that): before the outbox held frames in chunks, 100k deltas
    cost 200 MiB. It is sent no more than its queue before `lagged`: with frames in chunks,
    an unbounded queue costs only about the frames' bytes, which the RSS alone would miss."""
    capd_dirs.extra_args = [
        "--max-queued-bytes",
        str(QUEUED_BYTES),
        "--max-frame-bytes",
        str(4 * 1024 * 1024),
    ]
    await asyncio.to_thread(capd_dirs.start)
    assert capd_dirs.proc is not None
    pid, deltas = capd_dirs.proc.pid, 40_000
    step = {"text": "d" * (10 * deltas), "chunk_chars": 10}
    await spawn(capd_dirs, "w1", scripted(step, step))
    socket_path = str(capd_dirs.pod_socket("w1"))
    alone, streamed = await _stream_turn(socket_path, pid, deltas)
    assert streamed > 2 * QUEUED_BYTES, "the stuck subscriber's queue should fill"
    unread, stuck = await asyncio.open_unix_connection(socket_path)
    stuck.write(b'{"method": "subscribe", "id": 1}\n')
    try:
        with_stuck, _ = await _stream_turn(socket_path, pid, deltas)
        queued = 0  # what the stuck one was sent, read at last: its queue, then `lagged`
        async with asyncio.timeout(60):
            while b'"lagged"' not in (line := await unread.readline()):
                assert b'"turn_end"' not in line, "the stuck subscriber was sent every event"
                queued += len(line)
    finally:
        stuck.close()
    assert with_stuck - alone < 16 * 2**20, f"{(with_stuck - alone) >> 20} MiB more"
    assert queued < QUEUED_BYTES + 2**20, f"{queued} bytes queued"  # and the socket's buffer
