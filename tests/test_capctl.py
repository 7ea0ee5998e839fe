"""capctl end to end: a real capd (the `capd` fixture) driven by capctl subprocesses."""

import asyncio
import json
import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from capctl.render import pod_table
from protocol.framing import decode, encode
from tests.conftest import CapdProcess
from tests.engine_scaffold import STAND_IN_CLAUDE
from tests.helpers import PS_HEADER

TIMEOUT_S = 10.0
pytestmark = pytest.mark.shared_capd

SLOW_STEP = {"text": "x" * 2000, "chunk_chars": 1, "delay_ms": 5}


def capctl_cmd(runtime_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "capctl", "--runtime-dir", str(runtime_dir), *args]


def capctl(
    runtime_dir: Path, *args: str, stdin: str | None = None, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        capctl_cmd(runtime_dir, *args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(runtime_dir: Path, *args: str) -> str:
    """Run capctl, expect exit 0, return stdout."""
    done = capctl(runtime_dir, *args)
    assert done.returncode == 0, f"capctl {' '.join(args)}: {done.stderr}"
    return done.stdout


def json_lines(text: str) -> list[dict[str, Any]]:
    """Each line must be exactly one JSON object."""
    objects = [json.loads(line) for line in text.splitlines()]
    assert objects, "no output"
    assert all(isinstance(obj, dict) for obj in objects)
    return objects


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("capctl: ")
    for needle in needles:
        assert needle in lines[0]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def pod_status(capd: CapdProcess, name: str) -> dict[str, Any]:
    return json.loads(ok(capd.runtime_dir, "status", name, "--json"))


def has_status(capd: CapdProcess, name: str, status: str) -> Callable[[], bool]:
    return lambda: pod_status(capd, name)["status"] == status


def spawn_scripted(
    capd: CapdProcess, tmp_path: Path, name: str, script: list[dict[str, Any]] | None = None
) -> None:
    manifest = {
        "name": name,
        "model": {"provider": "scripted", "script": script or []},
        "cwd": str(tmp_path),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    ok(capd.runtime_dir, "spawn", "-f", str(path))


class Output:
    """A child process's pipe, read as it grows: `until()` waits for text not seen yet."""

    def __init__(self, pipe: IO[bytes] | None) -> None:
        assert pipe is not None
        self._fd = pipe.fileno()
        self.text = ""
        self._mark = 0

    def until(self, needle: str, timeout: float = TIMEOUT_S) -> str:
        """Read until `needle` appears after the previous match; the text up to it."""
        deadline = time.monotonic() + timeout
        while (found := self.text.find(needle, self._mark)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{needle!r} not in output: {self.text!r}")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise AssertionError(f"output ended before {needle!r}: {self.text!r}")
                self.text += chunk.decode()
        seen, self._mark = self.text[self._mark : found], found + len(needle)
        return seen + needle


def start_capctl(runtime_dir: Path, *args: str) -> subprocess.Popen[bytes]:
    """capctl in the background, taking Ctrl-C (SIGINT) even when the suite itself was
    started with it ignored (`nohup pytest &`), as a terminal's capctl would."""
    return subprocess.Popen(
        capctl_cmd(runtime_dir, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_spawn_ps_and_status(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    out = ok(rt, "spawn", "w1", "--provider", "scripted", "--cwd", str(tmp_path))
    assert "w1" in out
    assert str(capd.pod_socket("w1")) in out

    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.yaml"
    manifest.write_text("name: w2\nmodel: {provider: scripted}\ncwd: .\ntools: [bash]\n")
    ok(rt, "spawn", "-f", str(manifest))

    table = ok(rt, "ps").splitlines()
    assert table[0].split() == PS_HEADER
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["w1"][1:] == ["idle", "-", "0", "-", "-", "-", str(capd.pod_socket("w1"))]
    assert rows["w2"][1] == "idle"

    status = pod_status(capd, "w2")
    assert status["name"] == "w2"
    assert status["status"] == "idle"
    assert status["cwd"] == str(tmp_path / "sub")
    assert status["tools"] == ["bash"]
    assert pod_status(capd, "w1")["tools"] == ["bash", "read_file", "write_file", "edit_file"]

    human = ok(rt, "status", "w1")
    assert "status:" in human
    assert "idle" in human
    assert re.search(r"context:\s+\d+ tokens \(window unknown\)", human)

    ok(rt, "stop", "w1")
    rows = {line.split()[0]: line.split() for line in ok(rt, "ps").splitlines()[1:]}
    assert rows["w1"][1:] == ["stopped", "-", "0", "-", "-", "-", "-"]

    # A server of its own at --base-url needs no key; the model name has a default.
    ok(rt, "spawn", "w3", "--provider", "anthropic", "--base-url", "http://127.0.0.1:9")
    assert pod_status(capd, "w3")["model"] == "anthropic/claude-sonnet-4-5"
    assert pod_status(capd, "w3")["context"]["window"] == 200_000
    assert re.search(r"context:\s+\d+ / 200,000 tokens \(0%\)", ok(rt, "status", "w3"))


def test_send_streams_the_reply_and_reports_errors(capd: CapdProcess, tmp_path: Path) -> None:
    spawn_scripted(capd, tmp_path, "w1", [{"text": "hello world", "chunk_chars": 3}])
    done = capctl(capd.runtime_dir, "send", "w1", "say", "hello")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello world\n"

    spawn_scripted(capd, tmp_path, "echo")
    done = capctl(capd.runtime_dir, "send", "echo", "-", stdin="from stdin")
    assert done.returncode == 0, done.stderr
    assert "from stdin" in done.stdout
    events = json_lines(ok(capd.runtime_dir, "log", "echo", "--json"))
    assert [e["text"] for e in events if e["event"] == "user_message"] == ["from stdin"]

    spawn_scripted(capd, tmp_path, "fails", [{"error": "boom"}])
    done = capctl(capd.runtime_dir, "send", "fails", "hi")
    assert done.returncode == 1
    assert "errored" in done.stderr
    assert "boom" in done.stderr
    assert "Traceback" not in done.stderr


def test_pause_resume_cancel_a_running_turn(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    spawn_scripted(capd, tmp_path, "w1", [SLOW_STEP])
    assert_one_line_error(capctl(rt, "pause", "w1"), "not_running")

    send = start_capctl(rt, "send", "w1", "go")
    try:
        out, err = Output(send.stdout), Output(send.stderr)
        out.until("x")
        ok(rt, "pause", "w1")
        err.until("paused")
        assert pod_status(capd, "w1")["status"] == "paused"
        ok(rt, "resume", "w1")
        err.until("resumed")
        ok(rt, "cancel", "w1")
        err.until("turn cancelled")
        assert send.wait(timeout=TIMEOUT_S) == 1
    finally:
        send.kill()
    assert "Traceback" not in err.text
    wait_for(has_status(capd, "w1", "idle"), "idle")


def test_send_detaches_on_ctrl_c(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    spawn_scripted(capd, tmp_path, "w1", [SLOW_STEP])
    send = start_capctl(rt, "send", "w1", "go")
    try:
        Output(send.stdout).until("x")
        send.send_signal(signal.SIGINT)
        _, err = send.communicate(timeout=TIMEOUT_S)
    finally:
        send.kill()
    assert send.returncode == 130
    assert "detached" in err.decode()
    assert "Traceback" not in err.decode()
    assert pod_status(capd, "w1")["status"] == "running"
    ok(rt, "cancel", "w1", "--all")


def test_notify_log_and_watch(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    spawn_scripted(capd, tmp_path, "w1")
    ok(rt, "send", "w1", "ping")
    watch = start_capctl(rt, "watch", "w1", "--from-seq", "0")
    try:
        shown = Output(watch.stdout)
        shown.until("user: ping")
        shown.until("finished")
        ok(rt, "notify", "w1", "build", "done", "--source", "ci")
        shown.until("notification from ci: build done")
        shown.until("finished")

        events = json_lines(ok(rt, "log", "w1", "--json"))
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        notes = [e for e in events if e["event"] == "notification"]
        assert [(n["source"], n["text"]) for n in notes] == [("ci", "build done")]
        assert [e["invoke"] for e in events if e["event"] == "turn_start"] == ["run", "notify"]

        log = ok(rt, "log", "w1").splitlines()
        assert "user: ping" in log
        assert any(line.startswith("assistant: ") and "ping" in line for line in log)
        assert "notification from ci: build done" in log
        assert sum(line.endswith(" finished") for line in log) == 2
        page = json_lines(ok(rt, "log", "w1", "--json", "--from-seq", "3", "--limit", "2"))
        assert [e["seq"] for e in page] == [4, 5]

        ok(rt, "send", "w1", "live", "one")
        shown.until("live one\n── turn")
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=TIMEOUT_S)
    finally:
        watch.kill()
    assert watch.returncode == 0
    assert "Traceback" not in err.decode()


def test_spawn_says_which_cwd_the_pod_got(capd: CapdProcess, tmp_path: Path) -> None:
    """Without --cwd, capctl's current directory; with -f and no cwd, capd's default."""
    here = subprocess.run(
        capctl_cmd(capd.runtime_dir, "spawn", "here", "--provider", "scripted"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    socket = capd.pod_socket("here")
    assert here.stdout == f"spawned here in {tmp_path.resolve()} (socket {socket})\n"
    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: there\nmodel: {provider: scripted}\n")
    there = ok(capd.runtime_dir, "spawn", "-f", str(manifest))
    work = (capd.state_dir / "pods" / "there" / "work").resolve()
    assert there == f"spawned there in {work} (socket {capd.pod_socket('there')})\n"


def test_json_output_is_one_object_per_line(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    spawned = json_lines(ok(rt, "--json", "spawn", "w1", "--provider", "scripted"))
    cwd = str(Path.cwd().resolve())  # capctl's own, as no --cwd was given
    assert spawned == [{"name": "w1", "socket": str(capd.pod_socket("w1")), "cwd": cwd}]
    assert json_lines(ok(rt, "ps", "--json"))[0]["pods"][0]["name"] == "w1"
    assert json_lines(ok(rt, "--json", "info"))[0]["pid"] == capd.proc.pid

    sent = json_lines(ok(rt, "send", "w1", "--json", "hi"))
    assert "turn_id" in sent[0]
    kinds = [e.get("event") for e in sent[1:]]
    assert "text_delta" in kinds
    assert kinds[-1] == "turn_end"
    assert all(e["turn_id"] == sent[0]["turn_id"] for e in sent[1:])


@pytest.mark.own_capd
def test_stop_start_rm_shutdown(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    spawn_scripted(capd, tmp_path, "w1")
    ok(rt, "send", "w1", "remember me")
    ok(rt, "stop", "w1")
    assert ok(rt, "ps").splitlines()[1].split()[:2] == ["w1", "stopped"]
    assert_one_line_error(capctl(rt, "status", "w1"), "w1", "stopped")

    ok(rt, "start", "w1")
    assert "user: remember me" in ok(rt, "log", "w1")
    ok(rt, "rm", "w1")
    assert_one_line_error(capctl(rt, "status", "w1"), "no pod named w1")

    ok(rt, "shutdown")
    assert capd.proc is not None
    assert capd.proc.wait(timeout=TIMEOUT_S) == 0


def test_errors_are_one_line(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    assert_one_line_error(capctl(rt, "send", "nope", "hi"), "no pod named nope")
    assert_one_line_error(capctl(rt, "stop", "nope"), "not_found")

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: w1\nmodel: [\n")
    assert_one_line_error(capctl(rt, "spawn", "-f", str(bad_yaml)), "bad manifest", "line")
    bad_field = tmp_path / "field.yaml"
    bad_field.write_text("name: w1\nmodel: {provider: nope}\n")
    assert_one_line_error(capctl(rt, "spawn", "-f", str(bad_field)), "model.provider")
    missing = tmp_path / "missing.yaml"
    assert_one_line_error(capctl(rt, "spawn", "-f", str(missing)), "cannot read manifest")

    spawn_scripted(capd, tmp_path, "w1")
    assert_one_line_error(capctl(rt, "spawn", "w1", "--provider", "scripted"), "already_exists")

    usage = capctl(rt, "status", "Not-A-Name")
    assert usage.returncode == 2
    assert "Traceback" not in usage.stderr


@pytest.mark.parametrize("args", [("ps",), ("status", "w1"), ("send", "w1", "hi")])
def test_no_daemon(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = capctl(tmp_path, *args)
    assert_one_line_error(done, f"cannot reach capd at {tmp_path / 'capd.sock'}", "running?")


def test_ps_shows_children_under_their_parents() -> None:
    pods = [
        {
            "name": "kid",
            "status": "running",
            "parent": "/r/pods/boss.sock",
            "socket": "/r/k",
            "engine": {"state": "running", "pid": 4242},
        },
        {
            "name": "boss",
            "status": "idle",
            "parent": None,
            "socket": "/r/pods/boss.sock",
            "spent": {"tokens": 1234, "usd": 0.0512},
            "team": "pay",
            "engine": {"state": "stopped", "pid": None},
        },
        {"name": "grandkid", "status": "paused", "parent": "/r/k", "socket": "/r/g"},
        {"name": "orphan", "status": "stopped", "parent": "/r/gone.sock", "socket": "/r/o"},
        {"name": "nap", "status": "stopped", "parent": None, "socket": "/r/pods/nap.sock"},
        {"name": "woke", "status": "idle", "parent": "/r/pods/nap.sock", "socket": "/r/w"},
    ]
    header, *rows = pod_table(pods).splitlines()
    assert header.split() == PS_HEADER
    assert [(len(row) - len(row.lstrip()), row.split()) for row in rows] == [
        (0, ["boss", "idle", "-", "1,234", "$0.05", "pay", "stopped", "/r/pods/boss.sock"]),
        (2, ["kid", "running", "boss", "0", "-", "-", "pid", "4242", "/r/k"]),
        (4, ["grandkid", "paused", "kid", "0", "-", "-", "-", "/r/g"]),
        (0, ["nap", "stopped", "-", "0", "-", "-", "-", "-"]),
        (2, ["woke", "idle", "nap", "0", "-", "-", "-", "/r/w"]),
        (0, ["orphan", "stopped", "/r/gone.sock", "0", "-", "-", "-", "-"]),
    ]
    assert len({row.index(row.split()[1]) for row in rows}) == 1, "STATUS is one column"


LAGGED_TURN: list[tuple[str, list[dict[str, Any]]]] = [
    ("subscribe", []),
    (
        "run",
        [
            {"event": "text_delta", "pod": "p", "turn_id": "t1", "text": "Hel"},
            {"event": "lagged", "pod": "p", "missed": 9, "resume_from": 3},
        ],
    ),
    (
        "subscribe",
        [
            {
                "event": "assistant_message",
                "pod": "p",
                "seq": 4,
                "turn_id": "t1",
                "text": "Hello world",
                "tool_calls": [{"id": "c1", "name": "bash", "arguments": {"command": "ls"}}],
            },
            {"event": "tool_result", "pod": "p", "seq": 5, "turn_id": "t1", "call_id": "c1"}
            | {"name": "bash", "output": "a\nb", "is_error": False},
            {"event": "text_delta", "pod": "p", "turn_id": "t1", "text": "now"},
            {"event": "assistant_message", "pod": "p", "seq": 6, "turn_id": "t1"}
            | {"text": "Bye now", "tool_calls": []},
            {"event": "turn_end", "pod": "p", "seq": 7, "turn_id": "t1", "result": "finished"},
        ],
    ),
]


async def test_send_recovers_from_a_lag(tmp_path: Path) -> None:
    """A pod socket that reports `lagged` mid-step: capctl re-subscribes and still prints
    each step's text whole and once (the live tail of a half-missed step is not shown)."""
    requests: list[dict[str, Any]] = []

    async def pod(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = {"event": "hello", "protocol": 1, "server": "fake", "pod": None}
        writer.write(encode(hello))
        for method, events in LAGGED_TURN:
            request = decode(await reader.readline())
            requests.append(request)
            assert request["method"] == method
            result = {"turn_id": "t1"} if method == "run" else {"last_seq": 5}
            writer.write(encode({"event": "ack", "id": request["id"], "result": result}))
            for event in events:
                writer.write(encode(event))
        await writer.drain()
        writer.close()

    (tmp_path / "pods").mkdir()
    server = await asyncio.start_unix_server(pod, path=str(tmp_path / "pods" / "p.sock"))
    async with server:
        proc = await asyncio.create_subprocess_exec(
            *capctl_cmd(tmp_path, "send", "p", "hi"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    assert out.decode() == "Hello world\nBye now\n"
    assert [r.get("after_seq") for r in requests if r["method"] == "subscribe"] == [None, 3]
    notes = err.decode().splitlines()
    assert notes[0].startswith("(fell behind: 9 events missed")
    assert notes[1:] == ['→ bash {"command":"ls"}', "← bash: a (+1 lines)"]


def test_ready_waits_for_a_daemon_that_is_starting(capd_dirs: CapdProcess) -> None:
    """`capctl ready` started before capd returns once capd answers."""
    waiter = subprocess.Popen(
        [sys.executable, "-m", "capctl", "--runtime-dir", str(capd_dirs.runtime_dir), "ready"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    capd_dirs.start()
    out, err = waiter.communicate(timeout=20)
    assert waiter.returncode == 0, err
    assert "is ready" in out


def test_ready_times_out_without_a_daemon(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "capctl",
            "--runtime-dir",
            str(tmp_path),
            "ready",
            "--timeout",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("capctl: capd did not answer")
    assert "Traceback" not in done.stderr


def test_spawn_with_a_parent_reports_to_it(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    ok(rt, "spawn", "boss", "--provider", "scripted", "--cwd", str(tmp_path))
    ok(rt, "spawn", "kid", "--provider", "scripted", "--cwd", str(tmp_path), "--parent", "boss")
    assert pod_status(capd, "kid")["parent"] == str(capd.pod_socket("boss"))
    ok(rt, "send", "kid", "ping")
    watch = start_capctl(rt, "watch", "boss", "--from-seq", "0")
    try:
        Output(watch.stdout).until("report from kid: turn_ended finished")
    finally:
        watch.kill()
        watch.wait()
    rows = ok(rt, "ps").splitlines()[1:]
    assert [(row.split()[0], row.split()[2]) for row in rows] == [("boss", "-"), ("kid", "boss")]
    bad = capctl(rt, "spawn", "x", "--provider", "scripted", "--parent", "Not A Pod")
    assert bad.returncode == 2
    assert "neither a pod name nor a socket path" in bad.stderr


def test_spawn_mcp_adds_servers_and_status_shows_each(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    ok(
        rt,
        "spawn",
        "w1",
        "--provider",
        "scripted",
        "--mcp",
        "tm=mcp-server-nowhere --local-timezone 'Europe/Paris' $HOME",
        "--mcp",
        "docs=http://127.0.0.1:9/mcp",
    )
    with sqlite3.connect(capd.state_dir / "capd.db") as db:
        (row,) = db.execute("SELECT manifest FROM pods WHERE name = 'w1'")
    assert json.loads(row[0])["mcp_servers"] == {
        "tm": {
            "type": "stdio",
            "command": "mcp-server-nowhere",
            "args": ["--local-timezone", "Europe/Paris", "$HOME"],
            "env": {},
        },
        "docs": {"type": "http", "url": "http://127.0.0.1:9/mcp", "headers": {}},
    }
    wait_for(lambda: "tm: failed" in ok(rt, "status", "w1"), "the missing server to fail")
    shown = ok(rt, "status", "w1")
    assert re.search(r"^mcp: +tm: failed \(stdio[^)]*\): .*mcp-server-nowhere", shown, re.M), shown
    assert re.search(r"^ +docs: (starting|failed) \(http", shown, re.MULTILINE), shown

    # An external engine's servers show in status as soon as the pod is spawned.
    state = tmp_path / "claude"
    state.mkdir()
    manifest = {
        "name": "cc",
        "engine": STAND_IN_CLAUDE.engine(state),
        "cwd": str(tmp_path),
        "mcp_servers": {
            "git": {"command": "mcp-server-git"},
            "gone": {"command": "x", "env": {"K": "${CAPD_TEST_UNSET_VARIABLE}"}},
        },
    }
    path = tmp_path / "cc.yaml"
    path.write_text(yaml.safe_dump(manifest))
    ok(rt, "spawn", "-f", str(path))
    assert re.search(
        r"^mcp: +git: starting \(stdio, run by the engine\)\n +gone: failed \(stdio, run by",
        ok(rt, "status", "cc"),
        re.MULTILINE,
    )
    ok(rt, "send", "cc", "hello")
    shown = ok(rt, "status", "cc")
    assert re.search(
        r"^mcp: +git: ready \(1 tool, stdio, run by the engine\)\n"
        r" +gone: failed \(stdio, run by the engine\): \$\{CAPD_TEST_UNSET_VARIABLE\} is not set",
        shown,
        re.MULTILINE,
    ), shown


def test_spawn_mcp_usage_errors(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    manifest = tmp_path / "m.yaml"
    manifest.write_text("name: w1\nmodel: {provider: scripted}\n")
    flags = ("w1", "--provider", "scripted")
    refusals = {
        (*flags, "--mcp", "bad__name=x"): "NAME must be 1-32 of A-Z a-z 0-9 _ -",
        (*flags, "--mcp", "=x"): "NAME must be",
        (*flags, "--mcp", "tm="): "give the server's COMMAND after NAME=",
        (*flags, "--mcp", "tm=x 'open"): "cannot split COMMAND",
        (*flags, "--mcp", "tm=x", "--mcp", "tm=y"): "tm is given twice",
        ("-f", str(manifest), "--mcp", "tm=x"): "--mcp: put these in the manifest with -f",
    }
    for args, needle in refusals.items():
        done = capctl(rt, "spawn", *args)
        assert (done.returncode, needle in done.stderr) == (2, True), (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert ok(rt, "ps").splitlines()[1:] == []
