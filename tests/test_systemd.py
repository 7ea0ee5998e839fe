"""systemd integration against stand-ins: a datagram socket playing $NOTIFY_SOCKET, and a
listening socket handed over the way socket activation does it."""

import asyncio
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.client import Client
from tests.conftest import CapdProcess
from tests.helpers import connect_pod, is_event, scripted, spawn, wait_for

WATCHDOG_USEC = 200_000


class NotifySocket:
    """What systemd listens on for sd_notify: a datagram socket; messages are parsed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def next(self, timeout: float = 10.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            data = await loop.sock_recv(self.sock, 4096)
        return dict(line.split("=", 1) for line in data.decode().splitlines() if line)

    async def until(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.next()
                if key in message:
                    return message


@pytest.fixture
def notify_socket(capd_dirs: CapdProcess) -> Iterator[NotifySocket]:
    path = Path(f"{capd_dirs.runtime_dir}-notify")
    notify = NotifySocket(path)
    yield notify
    notify.sock.close()
    path.unlink(missing_ok=True)


async def test_sd_notify_ready_watchdog_status_and_stopping(
    capd_dirs: CapdProcess, notify_socket: NotifySocket
) -> None:
    capd = capd_dirs
    capd.env = {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    await asyncio.to_thread(capd.start)
    ready = await notify_socket.until("READY")
    assert ready == {"READY": "1", "STATUS": "0 pods up, 0 running"}
    for _ in range(3):
        assert await notify_socket.next(timeout=2) == {"WATCHDOG": "1"}

    sleeper = {"name": "bash", "arguments": {"command": "env; sleep 30"}}
    await spawn(capd, "w1", scripted({"tool_calls": [sleeper]}, {"text": "ok"}), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("assistant_message"))
        assert (await notify_socket.until("STATUS"))["STATUS"] == "1 pods up, 1 running"
    assert capd.proc is not None
    capd.proc.send_signal(signal.SIGTERM)
    assert (await notify_socket.until("STOPPING"))["STOPPING"] == "1"
    assert await asyncio.to_thread(capd.proc.wait, 15) == 0


async def test_a_restore_extends_the_start_up_timeout_and_says_how_far_it_is(
    capd: CapdProcess, notify_socket: NotifySocket
) -> None:
    for name in ("w1", "w2"):
        await spawn(capd, name, scripted({"text": "ok"}))
    await asyncio.to_thread(capd.stop)
    capd.env = {"NOTIFY_SOCKET": str(notify_socket.path)}
    await asyncio.to_thread(capd.start)
    progress = await notify_socket.next()
    ready = await notify_socket.until("READY")
    assert progress == {"EXTEND_TIMEOUT_USEC": "30000000", "STATUS": "restoring pods: 0 of 2 up"}
    assert ready["STATUS"] == "2 pods up, 0 running"


async def test_tools_do_not_inherit_systemd_variables(
    capd_dirs: CapdProcess, notify_socket: NotifySocket
) -> None:
    capd = capd_dirs
    capd.env = {
        "NOTIFY_SOCKET": str(notify_socket.path),
        "WATCHDOG_USEC": "5000000",
        "WATCHDOG_PID": "1",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "1",
    }
    await asyncio.to_thread(capd.start)
    env = {"name": "bash", "arguments": {"command": "env"}}
    await spawn(capd, "w1", scripted({"tool_calls": [env]}, {"text": "ok"}), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        result, _ = await wait_for(pod, is_event("tool_result"))
    assert "PATH=" in result["output"]
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        assert f"{name}=" not in result["output"]


async def test_socket_activation_serves_the_passed_socket_and_leaves_it(
    capd_dirs: CapdProcess,
) -> None:
    capd = capd_dirs
    capd.runtime_dir.mkdir(mode=0o700)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(capd.socket))
    listening.listen()
    capd.listening = listening
    # A client that connects before capd runs waits in the backlog and is served.
    early = asyncio.create_task(Client.connect(capd.socket, timeout=15))
    await asyncio.to_thread(capd.start)
    async with await early as daemon:
        info = await daemon.request({"method": "info"})
    assert capd.proc is not None
    assert info["pid"] == capd.proc.pid
    assert capd.signal(signal.SIGTERM) == 0
    assert "socket-activated" in capd.output()
    assert capd.socket.exists(), "systemd owns the activated socket; capd leaves it"
    listening.close()
