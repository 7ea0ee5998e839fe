"""Framing, bad input and subscriptions (docs/protocol.md) against a real capd."""

import asyncio
import stat

import pytest

from protocol.client import Client, ConnectionClosed
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import connect_pod, is_event, scripted, spawn, wait_for


async def _raw(client: Client, line: bytes) -> dict:
    await client.send_raw(line)
    return await client.next_event(5)


pytestmark = pytest.mark.shared_capd


@pytest.mark.parametrize(
    ("line", "code", "echoed_id"),
    [
        (b"this is not json\n", "invalid_request", None),
        (b"[1, 2]\n", "invalid_request", None),
        (b'{"id": 4}\n', "invalid_request", 4),
        (b'{"method": "fly", "id": "a"}\n', "unknown_method", "a"),
        (b'{"method": "run", "id": 5}\n', "invalid_request", 5),
        (b'{"method": "run", "text": "x", "colour": "red", "id": 6}\n', "invalid_request", 6),
        (b'{"method": "run", "text": 3, "id": 7}\n', "invalid_request", 7),
        (b'{"method": "run", "text": "x", "if_busy": "shove", "id": 8}\n', "invalid_request", 8),
        (b'{"method": "history", "limit": -1, "id": 9}\n', "invalid_request", 9),
        (b'{"method": "status", "id": {"nested": 1}}\n', "invalid_request", None),
    ],
)
async def test_bad_requests_get_typed_errors_and_change_nothing(
    capd: CapdProcess, line: bytes, code: str, echoed_id: object
) -> None:
    await spawn(capd, "w1", scripted())
    async with await connect_pod(capd, "w1", subscribe=False) as pod:
        reply = await _raw(pod, line)
        assert reply["event"] == "error"
        assert reply["code"] == code
        assert reply["id"] == echoed_id
        assert reply["message"]
        status = await pod.request({"method": "status"})
    assert status["status"] == "idle"
    assert status["last_seq"] == 0


async def test_daemon_socket_rejects_pod_methods(capd: CapdProcess) -> None:
    async with await Client.connect(capd.socket) as daemon:
        with pytest.raises(ProtocolError) as err:
            await daemon.request({"method": "run", "text": "x"})
        assert err.value.code == "unknown_method"
        assert (await daemon.request({"method": "list"})) == {"pods": []}


async def test_replies_come_in_request_order(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted())
    async with await connect_pod(capd, "w1", subscribe=False) as pod:
        lines = b"".join(
            b'{"method": "status", "id": %d}\n' % i
            if i % 2
            else b'{"method": "nope", "id": %d}\n' % i
            for i in range(20)
        )
        await pod.send_raw(lines)
        ids = [(await pod.next_event(5))["id"] for _ in range(20)]
    assert ids == list(range(20))


async def test_oversized_frame_is_refused_and_the_connection_closed(
    capd_dirs: CapdProcess,
) -> None:
    capd_dirs.extra_args = ["--max-frame-bytes", "2048"]
    capd_dirs.start()
    async with await Client.connect(capd_dirs.socket) as daemon:
        await daemon.send_raw(b'{"method": "list", "pad": "' + b"x" * 5000 + b'"}\n')
        reply = await daemon.next_event(5)
        assert (reply["event"], reply["code"], reply["id"]) == ("error", "frame_too_large", None)
        with pytest.raises(ConnectionClosed):
            await daemon.next_event(5)
    async with await Client.connect(capd_dirs.socket) as daemon:
        assert (await daemon.request({"method": "list"})) == {"pods": []}


async def test_socket_and_directory_modes(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted())
    assert stat.S_IMODE(capd.runtime_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(capd.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(capd.pod_socket("w1").stat().st_mode) == 0o600


async def test_hello_names_the_pod(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted())
    async with await Client.connect(capd.socket) as daemon:
        assert daemon.hello is not None
        assert (daemon.hello.protocol, daemon.hello.pod) == (1, None)
    async with await Client.connect(capd.pod_socket("w1")) as pod:
        assert pod.hello is not None
        assert pod.hello.pod is not None
        assert (pod.hello.pod.name, pod.hello.pod.status, pod.hello.pod.last_seq) == (
            "w1",
            "idle",
            0,
        )


async def test_subscribe_replays_then_goes_live_without_gap_or_duplicate(
    capd: CapdProcess, tmp_path
) -> None:
    steps = [
        {"text": f"step {i}", "tool_calls": [{"name": "bash", "arguments": {"command": "true"}}]}
        for i in range(40)
    ]
    await spawn(capd, "w1", scripted(*steps, {"text": "done"}), cwd=str(tmp_path), tools=["bash"])
    async with await connect_pod(capd, "w1") as driver:
        await driver.request({"method": "run", "text": "go"})
        await wait_for(driver, is_event("tool_result"))
        async with await connect_pod(capd, "w1", subscribe=False) as late:
            ack = await late.request({"method": "subscribe", "after_seq": 0})
            assert ack["last_seq"] > 0
            _, seen = await wait_for(late, is_event("turn_end"))
    seqs = [e["seq"] for e in seen if "seq" in e]
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) > ack["last_seq"]


async def test_subscribe_without_after_seq_is_live_only(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted({"text": "one"}, {"text": "two"}))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "a"})
        await wait_for(pod, is_event("status", status="idle"))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "b"})
        first, _ = await wait_for(pod, lambda e: "seq" in e)
        await pod.request({"method": "unsubscribe"})
    assert first["seq"] == 7


async def test_a_subscriber_that_never_reads_gets_lagged_and_can_resync(
    capd_dirs: CapdProcess,
) -> None:
    # ~1.5 MB of deltas: more than the kernel's socket buffer (about 200 KB) plus the
    # 512 KiB outbox, so the reader that never reads lags; the one that reads would have
    # to fall 512 KiB behind to lag. It reads raw lines, not parsed events, so that even a
    # machine busy with other tests does not make it fall that far behind.
    capd_dirs.extra_args = ["--max-queued-bytes", str(512 * 1024)]
    capd_dirs.start()
    step = {"text": "y" * 20000, "chunk_chars": 1, "delay_ms": 0.1}
    await spawn(capd_dirs, "w1", scripted(step))
    slow_reader, slow_writer = await asyncio.open_unix_connection(str(capd_dirs.pod_socket("w1")))
    await slow_reader.readline()
    slow_writer.write(b'{"method": "subscribe", "id": 1}\n')
    await slow_writer.drain()
    assert await _deltas_of_a_turn(capd_dirs) == 20000
    slow = Client(slow_reader, slow_writer)
    try:
        lagged = await _lagged(slow)
        assert lagged["missed"] > 0
        await slow.request({"method": "subscribe", "after_seq": lagged["resume_from"]})
        end, replay = await wait_for(slow, is_event("turn_end"))
        assert end["result"] == "finished"
        assert replay[0]["seq"] == lagged["resume_from"] + 1
    finally:
        await slow.close()


async def _deltas_of_a_turn(capd: CapdProcess) -> int:
    """Subscribe, run a turn of pod w1 and read its events as raw lines until its
    `turn_end`; the number of text deltas read (none may be lost)."""
    reader, writer = await asyncio.open_unix_connection(str(capd.pod_socket("w1")))
    try:
        await reader.readline()
        writer.write(b'{"method":"subscribe","id":1}\n{"method":"run","text":"go","id":2}\n')
        deltas = 0
        async with asyncio.timeout(60):
            while b'"event":"turn_end"' not in (line := await reader.readline()):
                assert b'"event":"lagged"' not in line, "the reader that reads fell behind"
                deltas += b'"event":"text_delta"' in line
        return deltas
    finally:
        writer.close()


async def _lagged(slow: Client) -> dict:
    """Read the slow connection's backlog (raw, its reader was never started) up to `lagged`."""
    from protocol.framing import decode

    async with asyncio.timeout(10):
        while True:
            frame = decode(await slow._reader.readline())
            if frame.get("event") == "lagged":
                slow._read_task = asyncio.create_task(slow._read_loop())
                return frame
