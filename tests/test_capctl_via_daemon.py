"""capctl's pod commands through the daemon socket (`--via-daemon`, $CAPCTL_VIA_DAEMON),
as it talks to a pod another node hosts. The pod's own socket is moved away first, so
only the daemon socket can reach it."""

import asyncio
import json
import os
import re
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from capctl.oneshot import why_absent
from capctl.render import pod_table
from capctl.session import connect_pod
from capctl.tui.attach import AttachApp
from protocol.client import Client
from tests.conftest import CapdProcess
from tests.helpers import EVENT_TIMEOUT_S, PS_HEADER
from tests.test_attach import SIZE, until_shown
from tests.test_capctl import (
    TIMEOUT_S,
    Output,
    assert_one_line_error,
    capctl,
    capctl_cmd,
    json_lines,
    ok,
    spawn_scripted,
    start_capctl,
)

pytestmark = pytest.mark.shared_capd


@pytest.fixture
def hidden(capd: CapdProcess, tmp_path: Path) -> Iterator[Path]:
    """Pod w1, its socket file moved aside while the test runs."""
    spawn_scripted(capd, tmp_path, "w1")
    socket = capd.pod_socket("w1")
    aside = socket.with_name("w1.aside")
    socket.rename(aside)
    yield socket
    aside.rename(socket)


def test_send_watch_and_log_through_the_daemon(capd: CapdProcess, hidden: Path) -> None:
    rt = capd.runtime_dir
    unreachable = capctl(rt, "send", "w1", "ping")
    assert_one_line_error(unreachable, f"pod w1 is idle but nothing answers at {hidden}")

    watch = start_capctl(rt, "--via-daemon", "watch", "w1", "--from-seq", "0")
    try:
        shown = Output(watch.stdout)
        sent = ok(rt, "--via-daemon", "send", "w1", "ping")
        shown.until("user: ping")
        shown.until("finished")
        ok(rt, "stop", "w1")  # the watch ends as on the pod's socket, when it closes
        _, err = watch.communicate(timeout=TIMEOUT_S)
    finally:
        watch.kill()
    assert "ping" in sent
    assert watch.returncode == 0
    assert err.decode() == "capctl: w1 closed the connection (stopped?)\n"
    ok(rt, "start", "w1")
    hidden.unlink()  # `start` made a new one

    env_run = subprocess.run(
        capctl_cmd(rt, "--json", "log", "w1"),
        env={**os.environ, "CAPCTL_VIA_DAEMON": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    events = json_lines(env_run.stdout)
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert [event["text"] for event in events if event["event"] == "user_message"] == ["ping"]


def test_one_request_commands_through_the_daemon(capd: CapdProcess, hidden: Path) -> None:
    rt = capd.runtime_dir
    status = json.loads(ok(rt, "--via-daemon", "--json", "status", "w1"))
    info = json.loads(ok(rt, "--json", "info"))
    assert status["name"] == "w1"
    assert status["node"] == info["node"]
    human = ok(rt, "info")
    assert re.search(rf"^node: +{re.escape(info['node'])}$", human, re.MULTILINE)
    assert re.search(rf"^fleet: +{re.escape(info['node'])} \(1 pods\)$", human, re.MULTILINE)
    assert_one_line_error(capctl(rt, "--via-daemon", "pause", "w1"), "not_running: pod w1 is idle")
    ok(rt, "--via-daemon", "notify", "w1", "hello", "--source", "ci")
    sent = ok(rt, "--via-daemon", "--json", "send", "w1", "again", "--queue")
    assert json_lines(sent)[-1]["event"] == "turn_end"
    assert_one_line_error(
        capctl(rt, "--via-daemon", "status", "nope"), "not_found: no pod named nope"
    )
    ok(rt, "stop", "w1")
    assert_one_line_error(
        capctl(rt, "--via-daemon", "cancel", "w1"),
        "not_running: pod w1 is stopped; `capctl start w1` brings it back",
    )
    ok(rt, "start", "w1")
    hidden.unlink()


def test_ps_shows_a_pod_another_node_hosts() -> None:
    """A `list` entry with no socket: not every top-level pod's parent, and its node shown."""
    pods = [
        {"name": "here", "status": "idle", "parent": None, "socket": "/r/pods/here.sock"},
        {"name": "there", "status": "running", "parent": None, "socket": None, "node": "n2"},
    ]
    header, *rows = pod_table(pods).splitlines()
    assert header.split() == PS_HEADER
    assert [row.split() for row in rows] == [
        ["here", "idle", "-", "0", "-", "-", "-", "/r/pods/here.sock"],
        ["there", "running", "-", "0", "-", "-", "-", "on", "n2"],
    ]


async def test_attach_through_the_daemon(capd: CapdProcess, hidden: Path) -> None:
    """Attach's screen on the daemon socket: the replay, a line typed runs a turn, and the
    pod's stop ends it as its socket closing would."""
    connect = partial(connect_pod, capd.runtime_dir, "w1", True)
    app = AttachApp("w1", connect, 3)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.attached
        await until_shown(pilot, screen, lambda t: "live from here" in t, "the subscription")
        await pilot.press(*"hello", "enter")
        await until_shown(pilot, screen, lambda t: "finished" in t, "the turn's end")
        async with await Client.connect(capd.socket) as daemon:
            await daemon.request({"method": "stop", "name": "w1"})
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            while app.is_running:
                await pilot.pause(0.02)
    assert app.return_value == "pod w1 closed the connection (stopped?)"
    await asyncio.to_thread(ok, capd.runtime_dir, "start", "w1")
    hidden.unlink()


def test_a_pod_listed_with_no_socket_is_reached_through_the_daemon() -> None:
    """What capctl decides when nothing answers at a pod's socket: only a pod listed up
    with no socket (another node's) goes through the daemon socket (None)."""
    path = Path("/r/pods/w1.sock")

    def entry(**fields: object) -> list[dict[str, object]]:
        return [{"name": "w0", "status": "idle", "socket": None}, {"name": "w1", **fields}]

    assert why_absent(entry(status="running", socket=None, node="n2"), "w1", path) is None
    assert why_absent(entry(status="stopped", socket=None), "w1", path) == (
        "pod w1 is stopped (capctl start w1 brings it back)"
    )
    assert why_absent(entry(status="idle", socket=str(path)), "w1", path) == (
        f"pod w1 is idle but nothing answers at {path}"
    )
    assert why_absent(entry()[:1], "w1", path) == f"no pod named w1 (no socket at {path})"
