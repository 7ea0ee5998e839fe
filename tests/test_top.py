"""`capctl top` against a real capd: in a real terminal (tmux, `tests/tmux.py`) for what a
person sees and types, through textual's Pilot for the keys' logic, and `top --once`."""

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from capctl.tui.feed import Feed
from capctl.tui.rows import COLUMNS, cells, tree
from capctl.tui.top import KEYS, TopApp
from protocol.client import Client
from protocol.framing import decode, encode
from tests.conftest import REPO, CapdProcess
from tests.helpers import daemon_request, scripted, spawn
from tests.promcheck import samples, value
from tests.tmux import Screen

pytestmark = pytest.mark.shared_capd

SLEEP = {"tool_calls": [{"name": "bash", "arguments": {"command": "sleep 30"}}]}
HEADER = re.compile(r"^ ?" + r"\s+".join(re.escape(name) for name, _ in COLUMNS) + r"$", re.M)


def capctl(capd: CapdProcess, *args: str) -> list[str]:
    return [sys.executable, "-m", "capctl", "--runtime-dir", str(capd.runtime_dir), *args]


async def spawn_tree(capd: CapdProcess, cwd: Path) -> list[tuple[str, int]]:
    """Three parents with two children each (c2a runs `sleep 30` twice once told to); the
    rows `top` shows, in order, with their depth."""
    rows = []
    for parent in ("p1", "p2", "p3"):
        socket = await spawn(capd, parent, scripted(), cwd=str(cwd), tools=["bash"])
        rows.append((parent, 0))
        for child in (f"c{parent[1]}a", f"c{parent[1]}b"):
            model = scripted(SLEEP, SLEEP, {"text": "done"}) if child == "c2a" else scripted()
            manifest = {"name": child, "model": model, "cwd": str(cwd), "tools": ["bash"]}
            await daemon_request(
                capd, {"method": "spawn", "parent": str(socket), "manifest": manifest}
            )
            rows.append((child, 1))
    return rows


async def pod_request(capd: CapdProcess, pod: str, request: dict[str, Any]) -> dict[str, Any]:
    async with await Client.connect(capd.pod_socket(pod)) as client:
        return await client.request(request)


async def test_top_shows_the_tree_and_steers_the_pod_on_the_cursor_row(
    capd: CapdProcess, tmp_path: Path
) -> None:
    rows = await spawn_tree(capd, tmp_path)
    await pod_request(capd, "c2a", {"method": "run", "text": "go"})
    with Screen(capctl(capd, "top"), width=120, height=30, conf_dir=tmp_path) as screen:
        screen.wait_for(re.compile(r"c2a\s+running\s+t-\w+\s+1\s+bash"))
        # the last row whole, to its USD column: the frame is painted (tmux may show it
        # halfway through)
        shown = screen.wait_for(re.compile(r"^\s+c3b(\s+\S+){8}$", re.M))
        assert HEADER.search(shown), shown
        names = [line.split()[0] for line in shown.splitlines()[1:] if line.strip()][:9]
        assert names == [name for name, _ in rows]
        for name, depth in rows:
            assert re.search(rf"^ ?{'  ' * depth}{name}\s", shown, re.M), (name, shown)
        screen.keys(*["Down"] * [name for name, _ in rows].index("c2a"))

        screen.keys("p")
        screen.wait_for(re.compile(r"c2a\s+paused"))
        assert (await pod_request(capd, "c2a", {"method": "status"}))["status"] == "paused"
        screen.keys("r")
        screen.wait_for("c2a: resumed")
        screen.wait_for(re.compile(r"c2a\s+running\s+t-\w+\s+2\s+bash"))
        screen.keys("c")
        screen.wait_for("c2a: cancelled")
        screen.wait_for(re.compile(r"c2a\s+idle\s+-\s+-\s+cancelled"))
        screen.keys("c")
        screen.wait_for("cancel c2a: not_running")

        screen.keys("q")
        assert screen.wait_exit() == 0


async def test_a_hundred_pods_are_listed_at_first_paint(capd: CapdProcess, tmp_path: Path) -> None:
    manifest = {"model": scripted(), "cwd": str(tmp_path)}
    async with await Client.connect(capd.socket) as daemon:
        await asyncio.gather(
            *(
                daemon.request({"method": "spawn", "manifest": {**manifest, "name": f"n{i:03d}"}})
                for i in range(100)
            )
        )
    with Screen(capctl(capd, "top"), width=120, height=30, conf_dir=tmp_path) as screen:
        screen.wait_for("100 pods, 0 running")
        screen.wait_for(re.compile(r"n000\s+idle"))
        metrics = (await daemon_request(capd, {"method": "metrics"}))["text"]
        # top's one connection (and this request's); none to a pod socket
        assert 'capd_connections{socket="daemon"} 2\n' in metrics
        assert 'capd_connections{socket="pod"} 0\n' in metrics
        assert 'capd_subscribers{socket="daemon"} 1\n' in metrics
        screen.keys(*["NPage"] * 4)
        screen.wait_for(re.compile(r"n099\s+idle"))
        screen.keys("C-c")
        assert screen.wait_exit() == 0


async def test_top_once_prints_the_tree(capd: CapdProcess, tmp_path: Path) -> None:
    rows = await spawn_tree(capd, tmp_path)
    await daemon_request(capd, {"method": "stop", "name": "c3b"})
    done = await asyncio.to_thread(
        subprocess.run, capctl(capd, "top", "--once"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert HEADER.match(lines[0])
    assert [line.split()[0] for line in lines[1:]] == [name for name, _ in rows]
    assert lines[1].startswith("p1 ")
    assert lines[2].startswith("  c1a ")
    assert re.match(r"^  c3b\s+stopped\s", lines[-1])


async def test_y_answers_the_oldest_question_and_errors_go_to_the_status_line(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """Through textual's Pilot: keys on the cursor row, a real pod asking permission."""
    permissions = {"default": "ask"}
    model = scripted({"tool_calls": [{"name": "bash", "arguments": {"command": "true"}}]})
    await spawn(capd, "idle1", scripted(), cwd=str(tmp_path))
    await spawn(capd, "asker", model, cwd=str(tmp_path), tools=["bash"], permissions=permissions)
    await pod_request(capd, "asker", {"method": "run", "text": "go"})
    app = TopApp(capd.runtime_dir, Feed(capd.socket))
    top = app.top
    async with app.run_test(size=(120, 20)) as pilot:
        await wait_until(pilot, lambda: top.feed.pods.get("asker", {}).get("permissions") == 1)
        assert "1 asking" in str(top.summary.render())
        await pilot.press("c")  # the cursor is on idle1
        await wait_until(pilot, lambda: "not_running" in top.note)
        await pilot.press("down", "y")
        await wait_until(pilot, lambda: top.note.startswith("asker: allowed"))
        await wait_until(pilot, lambda: top.feed.pods["asker"].get("last_result") == "finished")
        status = await pod_request(capd, "asker", {"method": "status"})
        assert status["permissions"] == []
        await pilot.press("y")
        await wait_until(pilot, lambda: top.note == "asker has no open permission question")
        await pilot.press("ctrl+c")
    assert app.return_code == 0


async def test_enter_opens_the_pod_and_ctrl_c_comes_back_to_the_table(
    capd: CapdProcess, tmp_path: Path
) -> None:
    from capctl.tui.attach import AttachScreen

    await spawn(capd, "w1", scripted(), cwd=str(tmp_path))
    app = TopApp(capd.runtime_dir, Feed(capd.socket))
    async with app.run_test(size=(120, 20)) as pilot:
        await wait_until(pilot, lambda: "w1" in app.top.feed.pods)
        await wait_until(pilot, lambda: app.top.current_pod() == "w1")
        for key in ("enter", "a"):
            await pilot.press(key)
            await wait_until(pilot, lambda: isinstance(app.screen, AttachScreen))
            assert app.screen.pod == "w1"
            await pilot.press("ctrl+c")
            await wait_until(pilot, lambda: app.screen is app.top)
            assert app.top.note == "detached from w1"
        await pilot.press("q")
    assert app.return_code == 0


async def test_the_feed_resyncs_after_it_lags_and_shows_what_overview_shows(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    """The feed's socket is not read while pods are spawned until capd cuts its
    subscription off with `lagged`; pods stopped, deleted and spawned after that reach it
    only through the new overview it takes once it reads again."""
    capd_dirs.extra_args = ["--max-queued-bytes", "1024"]
    await asyncio.to_thread(capd_dirs.start)
    manifest = {"model": scripted(), "cwd": str(tmp_path)}
    feed = Feed(capd_dirs.socket)
    await feed.connect()
    assert feed._writer is not None
    feed._writer.transport.pause_reading()  # type: ignore[attr-defined]
    async with await Client.connect(capd_dirs.socket) as daemon:

        async def lagged() -> float:
            text = (await daemon.request({"method": "metrics"}))["text"]
            return value(samples(text), "capd_subscriptions_lagged_total")

        batches = 0
        while not await lagged():  # the kernel's buffer, then 1 KiB of queue, fill
            assert batches < 20, "the feed never lagged"
            await asyncio.gather(
                *(
                    daemon.request({"method": "spawn", "manifest": {**manifest, "name": name}})
                    for name in (f"b{batches}-{i:02d}" for i in range(50))
                )
            )
            batches += 1
        await daemon.request({"method": "stop", "name": "b0-00"})
        await daemon.request({"method": "stop", "name": "b0-01"})
        await daemon.request({"method": "delete", "name": "b0-02"})
        await daemon.request({"method": "spawn", "manifest": {**manifest, "name": "late"}})
        expected = (await daemon.request({"method": "overview"}))["pods"]
    stale: list[str] = []
    resynced = asyncio.Event()

    def changed() -> None:
        if feed.resyncs:
            resynced.set()
        else:
            stale[:] = feed.pods

    follow = asyncio.create_task(feed.follow(changed))
    feed._writer.transport.resume_reading()  # type: ignore[attr-defined]
    try:
        await asyncio.wait_for(resynced.wait(), 10)
    finally:
        follow.cancel()
        await feed.close()
    assert "b0-02" in stale  # what the lag cost it: the deletion, and the pod spawned last
    assert "late" not in stale
    assert feed.resyncs == 1
    assert [(p["pod"], p["status"]) for p in feed.pods.values()] == [
        (p["pod"], p["status"]) for p in expected
    ]
    assert feed.pods["b0-00"]["status"] == "stopped"
    assert list(feed.pods.values()) == expected


async def wait_until(pilot: Any, done: Any, timeout: float = 10.0) -> None:
    """Let the app run until `done()` holds: textual has no event for "a reply came"."""
    async with asyncio.timeout(timeout):
        while not done():
            await pilot.pause(0.02)


def test_capctl_cli_does_not_load_textual() -> None:
    code = "import sys, capctl.cli, capctl.tui.rows; print('textual' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_the_readme_capture_has_the_table_s_layout() -> None:
    """README's capture of `top` was rendered for real; it must still show its columns."""
    section = (REPO / "README.md").read_text().split("### Watching many pods: `capctl top`")[1]
    lines = section.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert HEADER.match(lines[0]), lines[0]
    assert lines[-1].strip() == KEYS
    starts = [lines[0].index(name) for name, _ in COLUMNS]
    rows = lines[1 : lines.index("")]
    assert len(rows) >= 5
    for row in rows:
        assert row[starts[1] : starts[2]].split()[0] in ("idle", "running", "paused", "stopped")
        assert row[starts[1] - 2 : starts[1]] == "  "


def test_rows_put_children_under_parents_and_show_what_is_wrong() -> None:
    """Pure formatting: a child listed before its parent, a parent outside capd, an open
    question, a pod that could not be restored."""
    pods = {
        "kid": {"pod": "kid", "socket": "/r/kid.sock", "parent": "/r/mom.sock"},
        "mom": {"pod": "mom", "socket": "/r/mom.sock", "parent": None},
        "far": {"pod": "far", "socket": "/r/far.sock", "parent": "/elsewhere/x.sock"},
    }
    assert [(pod["pod"], depth) for pod, depth in tree(pods)] == [
        ("mom", 0),
        ("kid", 1),
        ("far", 0),
    ]
    asking = {"pod": "a", "status": "running", "permissions": 2, "phase": "permission"}
    broken = {"pod": "b", "status": "stopped", "error": "cannot be restored: ValueError"}
    assert cells(asking, 0, 0.0)[1:5:3] == ("running !2", "permission")
    assert cells(broken, 1, 0.0)[:2] == ("  b", "error")
    assert cells(broken, 1, 0.0)[4] == "not restored"


async def test_a_lag_before_the_overview_reply_takes_the_subscription_again(
    tmp_path: Path,
) -> None:
    """capd cuts the new subscription off while the feed waits for its overview: that
    overview may miss what came after, so the feed subscribes and asks again. A server
    speaking the daemon socket's wire plays capd, since only its timing is scripted."""
    asked: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(encode({"event": "hello", "protocol": 1, "server": "capd", "pod": None}))
        while line := await reader.readline():
            request = decode(line)
            asked.append(request["method"])
            reply: dict[str, Any] = {"event": "ack", "id": request["id"], "result": {}}
            if request["method"] == "subscribe":
                reply["result"] = {"last_seq": 0}
            elif len(asked) == 2:  # the first overview: its subscription lags first
                writer.write(encode({"event": "lagged", "pod": "", "missed": 3, "resume_from": 0}))
                reply["result"] = {"pods": [{"pod": "old", "status": "idle"}]}
            else:
                reply["result"] = {"pods": [{"pod": "new", "status": "running"}]}
            writer.write(encode(reply))

    path = tmp_path / "capd.sock"
    server = await asyncio.start_unix_server(serve, str(path))
    async with server:
        feed = Feed(path)
        await asyncio.wait_for(feed.connect(), 5)
        await feed.close()
    assert asked == ["subscribe", "overview", "subscribe", "overview"]
    assert feed.resyncs == 1
    assert feed.pods == {"new": {"pod": "new", "status": "running"}}
