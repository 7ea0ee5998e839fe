"""Tools from MCP servers (issue 18), black-box: a real capd, builtin pods whose scripted
(or fake OpenAI) model calls `mcp__<server>__<tool>`, and real servers nobody here wrote
(`mcp-server-time`, server-everything over stdio and Streamable HTTP), plus one small fake
whose tool list changes while it runs. Children and external engines are tested elsewhere."""

import asyncio
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol.client import Client
from tests.conftest import CapdProcess
from tests.fakes.openai_server import FunctionCall, OpenAITestServer, TextReply, ToolCallsReply
from tests.helpers import (
    Event,
    alive,
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    pause_turn,
    resume_turn,
    run_turn,
    scripted,
    sigkill,
    spawn,
    until,
    wait_for,
)
from tests.mcp_servers import McpServerCommands

pytestmark = pytest.mark.shared_capd

READY_TIMEOUT_S = 20.0
"""A server's start (0.7-2.5 s alone) on 2 busy cores, or a restart after a backoff."""
LIST_CHANGER = Path(__file__).parent / "fakes" / "mcp_list_changer.py"
TAP = Path(__file__).parent / "fakes" / "mcp_tap.py"
LONG = "trigger-long-running-operation"
EXECUTING = f"executing {LONG}"
"""The tap's line once server-everything sends the call's first progress (after 0.1 s)."""
State = dict[str, Any]
PROBE_S = 2.0
"""How long a server has to answer after a cancelled call before it is restarted."""
LEAK = 'echo "starting with token $MY_TOKEN" >&2; exit 3'
"""A server that fails at once and prints its secret on stderr on the way out."""


def call(name: str, **arguments: Any) -> dict[str, Any]:
    """A scripted step that calls one tool."""
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def everything(commands: McpServerCommands, **extra: Any) -> dict[str, Any]:
    """server-everything over stdio, as a manifest's server entry."""
    return {"command": commands.everything[0], "args": [commands.everything[1], "stdio"], **extra}


async def mcp_states(pod: Client) -> dict[str, State]:
    status = await pod.request({"method": "status"})
    return {server["name"]: server for server in status["mcp"]}


async def wait_mcp(
    pod: Client,
    name: str,
    predicate: Callable[[State], bool],
    timeout: float = READY_TIMEOUT_S,
) -> State:
    """Poll `status` until server `name` matches (status.mcp changes send no event)."""
    deadline = time.monotonic() + timeout
    while True:
        state = (await mcp_states(pod))[name]
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"status.mcp {name} did not match within {timeout:g} s: {state}")
        await asyncio.sleep(0.05)


def tapped(commands: McpServerCommands, log: Path) -> dict[str, Any]:
    """server-everything over stdio behind tests/fakes/mcp_tap.py, which logs to `log` what
    the server received and when it is executing a call. status.mcp's pid is the tap's."""
    server = everything(commands)
    return {
        "command": sys.executable,
        "args": [str(TAP), str(log), server["command"], *server["args"]],
    }


def tap_sandbox(log: Path) -> dict[str, Any]:
    """The sandbox of a pod with a `tapped` server: the tap writes its log."""
    return {"writable": [str(log.parent)]}


def long_call() -> dict[str, Any]:
    return call(f"mcp__everything__{LONG}", duration=30, steps=300)


async def logged(log: Path, line: str, times: int = 1, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until the tap has logged `line` `times` times: evidence, not a guess."""
    deadline = time.monotonic() + timeout
    while not log.exists() or log.read_text().splitlines().count(line) < times:
        if time.monotonic() > deadline:
            pytest.fail(f"the tap did not log {line!r} {times}x within {timeout:g} s")
        await asyncio.sleep(0.02)


def server_under(pid: int) -> int:
    """The real server: the end of the line of only children from `status.mcp`'s pid (the
    tap's, or in a sandbox bwrap's, whose child bwrap runs the tap)."""
    while len(children := Path(f"/proc/{pid}/task/{pid}/children").read_text().split()) == 1:
        pid = int(children[0])
    return pid


async def start_long_call(pod: Client, log: Path) -> tuple[dict[str, Any], int]:
    """Run a turn whose first step is `long_call()` on the tapped server-everything once it
    is ready, and return when the server executes the call: its `status.mcp` entry from
    before, and the real server's pid (the tap's child)."""
    before = await wait_mcp(pod, "everything", ready)
    server = server_under(before["pid"])
    await pod.request({"method": "run", "text": "go"})
    await logged(log, EXECUTING)  # it would run 30 s
    return before, server


def ready(state: State) -> bool:
    return state["state"] == "ready"


def restarted(old_pid: int) -> Callable[[State], bool]:
    """Ready again in a new process. (A changed pid alone is not enough: status.mcp has
    been seen to say `ready` with no pid for a few ms as a server dies.)"""
    return lambda state: ready(state) and state["pid"] not in (None, old_pid)


def results(seen: list[Event]) -> list[Event]:
    return [e for e in seen if e["event"] == "tool_result"]


@pytest.fixture
def stopped_pids() -> Iterator[list[int]]:
    """Processes a test SIGSTOPs: killed at the end if capd left them, so none hangs on."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def openai() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as server:
        yield server


def openai_model(server: OpenAITestServer) -> dict[str, Any]:
    return {"provider": "openai", "name": "test-model", "base_url": server.base_url}


async def test_time_server_is_offered_with_its_schema_and_answers(
    capd: CapdProcess, mcp_commands: McpServerCommands, openai: OpenAITestServer
) -> None:
    get_time = "mcp__time__get_current_time"
    openai.enqueue(
        ToolCallsReply(
            [
                FunctionCall(get_time, {"timezone": "UTC"}),
                FunctionCall(get_time, {"timezone": "Nowhere/Bad"}),
            ]
        ),
        TextReply("done"),
    )
    time_server = {"command": mcp_commands.time[0], "args": ["--local-timezone", "UTC"]}
    model = {**openai_model(openai), "tool_choice": get_time}
    await spawn(capd, "t1", model, mcp_servers={"time": time_server})
    async with await connect_pod(capd, "t1") as pod:
        first = (await mcp_states(pod))["time"]
        # Right away: the step waits for a server starting for the first time.
        end, seen = await run_turn(pod, "what time is it?")
        state = (await mcp_states(pod))["time"]
    assert first["state"] in ("starting", "ready")
    assert (first["transport"], first["managed_by"]) == ("stdio", "capd")
    assert (state["tools"], state["error"], state["restarts"]) == (2, None, 0)
    assert isinstance(state["pid"], int)
    assert end["result"] == "finished"
    good, bad = results(seen)
    assert good["is_error"] is False
    assert '"timezone": "UTC"' in good["output"]
    assert "datetime" in good["output"]
    assert bad["is_error"] is True
    assert "Invalid timezone" in bad["output"]
    specs = {t["function"]["name"]: t["function"] for t in openai.requests[0]["tools"]}
    assert set(specs) == {get_time, "mcp__time__convert_time"}
    forced = {"type": "function", "function": {"name": get_time}}
    assert openai.requests[0]["tool_choice"] == forced
    assert "tool_choice" not in openai.requests[1]
    assert specs[get_time]["description"] == "Get current time in a specific timezone"
    schema = specs[get_time]["parameters"]
    assert schema["required"] == ["timezone"]
    assert "IANA timezone name" in schema["properties"]["timezone"]["description"]


async def test_a_tool_choice_naming_a_down_servers_tool_is_not_forced(
    capd: CapdProcess, openai: OpenAITestServer, tmp_path: Path
) -> None:
    """Providers answer 400 to a tool_choice naming no offered tool (OpenAI, offered none:
    "'tool_choice' is only allowed when 'tools' are specified"): while the server is down
    the model chooses, so turns do not fail the same way."""
    openai.enqueue(TextReply("no tools today"))
    model = {**openai_model(openai), "tool_choice": "mcp__gone__lookup"}
    servers = {"gone": {"command": str(tmp_path / "no-such-server")}}
    await spawn(capd, "tc1", model, cwd=str(tmp_path), mcp_servers=servers)
    async with await connect_pod(capd, "tc1") as pod:
        end, _ = await run_turn(pod, "look it up")
        state = (await mcp_states(pod))["gone"]
    assert state["state"] == "failed"
    assert end["result"] == "finished"
    assert "tool_choice" not in openai.requests[0]


async def test_everything_results_become_text_the_model_reads(
    capd: CapdProcess, mcp_commands: McpServerCommands, openai: OpenAITestServer, tmp_path: Path
) -> None:
    big = "".join(secrets.token_hex(32) for _ in range(1600))  # 100 KiB: spilled
    calls = [
        ("get-tiny-image", {}),
        ("get-structured-content", {"location": "Chicago"}),
        ("get-resource-links", {"count": 2}),
        ("get-sum", {"a": "x", "b": 1}),
        ("echo", {"message": big}),
        ("no-such-tool", {}),
    ]
    openai.enqueue(
        ToolCallsReply([FunctionCall(f"mcp__everything__{n}", a) for n, a in calls]),
        TextReply("done"),
    )
    servers = {"everything": everything(mcp_commands)}
    await spawn(capd, "e1", openai_model(openai), cwd=str(tmp_path), mcp_servers=servers)
    async with await connect_pod(capd, "e1") as pod:
        state = await wait_mcp(pod, "everything", ready)
        end, seen = await run_turn(pod, "show me")
    assert Path(f"/proc/{state['pid']}/cwd").resolve() == tmp_path.resolve(), "the pod's cwd"
    echo = next(e for e in results(seen) if e["name"] == "mcp__everything__echo")
    spilled = re.search(r"/\S+/pods/e1/spill/[^\s\];]+", echo["output"])
    assert spilled, f"the note names the spill file: {echo['output'][-300:]}"
    assert big in Path(spilled[0]).read_text()
    await daemon_request(capd, {"method": "delete", "name": "e1"})
    await until(lambda: not alive(state["pid"]))  # stopped with its pod
    assert end["result"] == "finished"
    by_tool = {e["name"].removeprefix("mcp__everything__"): e for e in results(seen)}
    image = by_tool["get-tiny-image"]
    assert not image["is_error"]
    assert "image/png" in image["output"]
    assert "iVBORw0KGgo" not in image["output"], "the image's bytes are a note, not base64"
    structured = by_tool["get-structured-content"]
    assert '"temperature"' in structured["output"]
    assert '"conditions"' in structured["output"]
    links = by_tool["get-resource-links"]["output"]
    assert "demo://resource/dynamic/blob/1" in links
    assert "Text Resource 2" in links
    assert "demo://resource/dynamic/text/2" in links
    wrong = by_tool["get-sum"]
    assert wrong["is_error"] is True
    assert "expected number" in wrong["output"]
    echo = by_tool["echo"]
    assert not echo["is_error"]
    assert big[:1000] in echo["output"]
    assert len(echo["output"]) < 80 * 1024, "past 64 KiB the output is cut"
    assert "truncated" in echo["output"]
    assert by_tool["no-such-tool"]["is_error"] is True
    # server-everything adds its capability-dependent tools after `initialize`.
    sent = [t["function"]["name"] for t in openai.requests[0]["tools"]]
    assert "mcp__everything__simulate-research-query" in sent
    assert state["tools"] == len(sent) == len(set(sent))


async def test_a_changed_tool_list_is_offered_at_the_next_step(
    capd: CapdProcess, openai: OpenAITestServer
) -> None:
    openai.enqueue(
        ToolCallsReply([FunctionCall("mcp__changer__add-tool", {})]),
        ToolCallsReply([FunctionCall("mcp__changer__added", {})]),
        TextReply("done"),
    )
    changer = {"command": sys.executable, "args": [str(LIST_CHANGER)]}
    await spawn(capd, "c1", openai_model(openai), mcp_servers={"changer": changer})
    async with await connect_pod(capd, "c1") as pod:
        before = await wait_mcp(pod, "changer", ready)
        end, seen = await run_turn(pod, "add a tool and use it")
        after = (await mcp_states(pod))["changer"]
    offered = [[t["function"]["name"] for t in r.get("tools", [])] for r in openai.requests]
    assert offered[0] == ["mcp__changer__add-tool"]
    assert offered[1] == ["mcp__changer__add-tool", "mcp__changer__added"]
    assert [r["output"] for r in results(seen)] == ["added the tool `added`", "hello from added"]
    assert end["result"] == "finished"
    assert (before["tools"], after["tools"]) == (1, 2)


async def test_pause_and_cancel_interrupt_a_long_call_and_the_server_stays(
    capd: CapdProcess, mcp_commands: McpServerCommands, tmp_path: Path
) -> None:
    echo = call("mcp__everything__echo", message="still here")
    model = scripted(long_call(), echo, {"text": "after"}, long_call())
    log = tmp_path / "tap.log"
    await spawn(
        capd,
        "p1",
        model,
        mcp_servers={"everything": tapped(mcp_commands, log)},
        sandbox=tap_sandbox(log),
    )
    async with await connect_pod(capd, "p1") as pod:
        before, server = await start_long_call(pod, log)
        started = time.monotonic()
        seen = await pause_turn(pod)
        paused_after = time.monotonic() - started
        end, resumed = await resume_turn(pod)
        await pod.request({"method": "run", "text": "again"})
        await logged(log, EXECUTING, times=2)
        pings = log.read_text().splitlines().count("ping")
        started = time.monotonic()
        await pod.request({"method": "cancel"})
        cancelled, _ = await wait_for(pod, is_event("turn_end"))
        cancelled_after = time.monotonic() - started
        await logged(log, "ping", times=pings + 1)  # the probe after the cancellation
        # Past the 2 s in which the server must answer it.
        await asyncio.sleep(PROBE_S + 0.5 - (time.monotonic() - started))
        after = (await mcp_states(pod))["everything"]
    assert paused_after < 1.0, f"pause took {paused_after:.1f} s"
    interrupted, echoed = results(seen + resumed)
    assert interrupted["is_error"] is True
    assert echoed["is_error"] is False
    assert "still here" in echoed["output"]
    assert (end["result"], end["output"]) == ("finished", "after")
    assert cancelled["result"] == "cancelled"
    assert cancelled_after < 1.0, f"cancel took {cancelled_after:.1f} s"
    assert log.read_text().splitlines().count("notifications/cancelled") == 2, "told the server"
    assert ready(after), after
    assert (after["pid"], after["restarts"]) == (before["pid"], 0), "the server answered"
    assert alive(server)


async def test_pause_of_a_call_to_a_hung_server_restarts_it(
    capd: CapdProcess, mcp_commands: McpServerCommands, stopped_pids: list[int], tmp_path: Path
) -> None:
    """The pause does not wait for the server; the server, which cannot answer the
    cancellation, is restarted, and the resumed turn uses the new one."""
    echo = call("mcp__everything__echo", message="new server")
    model = scripted(long_call(), echo, {"text": "after"})
    log = tmp_path / "tap.log"
    await spawn(
        capd,
        "q1",
        model,
        mcp_servers={"everything": tapped(mcp_commands, log)},
        sandbox=tap_sandbox(log),
    )
    async with await connect_pod(capd, "q1") as pod:
        before, server = await start_long_call(pod, log)
        os.kill(server, signal.SIGSTOP)
        stopped_pids.append(server)
        started = time.monotonic()
        seen = await pause_turn(pod)
        paused_after = time.monotonic() - started
        again = await wait_mcp(pod, "everything", restarted(before["pid"]))
        end, resumed = await resume_turn(pod)
    assert paused_after < 1.0, f"pause took {paused_after:.1f} s"
    assert again["restarts"] == before["restarts"] + 1
    await until(lambda: not alive(server))
    cut, echoed = results(seen + resumed)
    assert cut["is_error"] is True
    assert not echoed["is_error"]
    assert "new server" in echoed["output"]
    assert (end["result"], end["output"]) == ("finished", "after")


async def test_a_hung_server_times_out_and_is_restarted(
    capd: CapdProcess, mcp_commands: McpServerCommands, stopped_pids: list[int], tmp_path: Path
) -> None:
    echo = call("mcp__everything__echo", message="back again")
    model = scripted(long_call(), {"text": "timed out"}, echo, {"text": "answered"})
    log = tmp_path / "tap.log"
    await spawn(
        capd,
        "h1",
        model,
        mcp_servers={"everything": tapped(mcp_commands, log)},
        sandbox=tap_sandbox(log),
        limits={"mcp_call_timeout_s": 1},
    )
    async with await connect_pod(capd, "h1") as pod:
        before = await wait_mcp(pod, "everything", ready)
        server = server_under(before["pid"])
        await pod.request({"method": "run", "text": "go"})
        # In the server's input: stopped now, it hangs with the call (the 1 s timeout
        # leaves too little room to wait for its progress on busy cores).
        await logged(log, f"tools/call {LONG}")
        os.kill(server, signal.SIGSTOP)
        stopped_pids.append(server)
        timed_out, _ = await wait_for(pod, is_event("tool_result"))
        await wait_for(pod, is_event("turn_end"))
        again = await wait_mcp(pod, "everything", restarted(before["pid"]))
        end, seen = await run_turn(pod, "again")
    assert timed_out["is_error"] is True
    assert (
        f"mcp__everything__{LONG} did not answer within 1 s "
        "(limits.mcp_call_timeout_s); the call was cancelled"
    ) in timed_out["output"]
    assert again["restarts"] == before["restarts"] + 1
    assert again["error"], "says why it last restarted"
    await until(lambda: not alive(server))
    assert [r["is_error"] for r in results(seen)] == [False]
    assert end["output"] == "answered"


async def test_a_server_killed_mid_call_is_unavailable_then_back(
    capd: CapdProcess, mcp_commands: McpServerCommands, tmp_path: Path
) -> None:
    echo = call("mcp__everything__echo", message="back again")
    model = scripted(long_call(), {"text": "lost it"}, echo, {"text": "answered"})
    log = tmp_path / "tap.log"
    await spawn(
        capd,
        "k1",
        model,
        mcp_servers={"everything": tapped(mcp_commands, log)},
        sandbox=tap_sandbox(log),
    )
    async with await connect_pod(capd, "k1") as pod:
        before, server = await start_long_call(pod, log)
        os.kill(server, signal.SIGKILL)  # the tap exits with it
        lost, _ = await wait_for(pod, is_event("tool_result"))
        await wait_for(pod, is_event("turn_end"))
        failed = await wait_mcp(pod, "everything", lambda s: s["state"] != "ready")
        again = await wait_mcp(pod, "everything", ready)
        end, seen = await run_turn(pod, "again")
    assert lost["is_error"] is True
    assert "MCP server everything is unavailable" in lost["output"]
    assert "capd is starting it again" in lost["output"]
    assert failed["state"] in ("failed", "starting")
    assert failed["error"]
    assert again["pid"] != before["pid"]
    assert again["restarts"] == before["restarts"] + 1
    assert [r["is_error"] for r in results(seen)] == [False]
    assert end["output"] == "answered"


async def test_servers_that_never_start_leave_the_pod_working(
    capd: CapdProcess, tmp_path: Path
) -> None:
    missing = str(tmp_path / "no-such-mcp-server")
    servers = {"missing": {"command": missing}, "sleeper": {"command": "sleep", "args": ["1000"]}}
    bash = call("bash", command="echo the pod works")
    await spawn(
        capd,
        "n1",
        scripted(bash, {"text": "ok"}),
        cwd=str(tmp_path),
        tools=["bash"],
        mcp_servers=servers,
        limits={"mcp_startup_timeout_s": 1},
    )
    async with await connect_pod(capd, "n1") as pod:
        end, seen = await run_turn(pod, "go")
        gone = await wait_mcp(pod, "missing", lambda s: s["state"] == "failed")
        hung = await wait_mcp(pod, "sleeper", lambda s: s["state"] == "failed")
    assert (end["result"], end["output"]) == ("finished", "ok")
    assert [r["output"] for r in results(seen)] == ["the pod works"]
    assert missing in gone["error"]
    assert gone["restarts"] < 5, "started again after a backoff, not in a loop"
    assert "did not start within 1 s" in hung["error"]


@pytest.mark.own_capd
async def test_secrets_reach_the_server_and_nothing_else(
    capd_dirs: CapdProcess, mcp_commands: McpServerCommands
) -> None:
    secret = f"s3cret-{secrets.token_hex(12)}"
    capd_dirs.env = {"CAPD_TEST_MCP_SECRET": secret}
    capd_dirs.log = capd_dirs.state_dir.with_name(f"{capd_dirs.state_dir.name}.log")
    capd_dirs.start()
    servers = {
        "everything": everything(mcp_commands, env={"MY_TOKEN": "${CAPD_TEST_MCP_SECRET}"}),
        "unset": everything(mcp_commands, env={"MY_TOKEN": "${CAPD_TEST_MCP_UNSET_VAR}"}),
        "leaky": {
            "command": "sh",
            "args": ["-c", LEAK],
            "env": {"MY_TOKEN": "${CAPD_TEST_MCP_SECRET}"},
        },
    }
    echo = call("mcp__everything__echo", message="hi")
    model = scripted(echo, {"text": "echoed"}, call("mcp__everything__get-env"), {"text": "env"})
    await spawn(capd_dirs, "s1", model, mcp_servers=servers)
    async with await connect_pod(capd_dirs, "s1") as pod:
        state = await wait_mcp(pod, "everything", ready)
        unset = await wait_mcp(pod, "unset", lambda s: s["state"] == "failed")
        leaky = await wait_mcp(pod, "leaky", lambda s: s["state"] == "failed")
        await run_turn(pod, "echo")
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
        environ = Path(f"/proc/{state['pid']}/environ").read_bytes().split(b"\0")
        assert f"MY_TOKEN={secret}".encode() in environ
        assert [server["name"] for server in status["mcp"]] == list(servers)
        assert "CAPD_TEST_MCP_UNSET_VAR" in unset["error"]
        assert "starting with token ${CAPD_TEST_MCP_SECRET}" in leaky["error"], "quotes stderr"
        assert secret not in str(status)
        assert secret not in str(await daemon_request(capd_dirs, {"method": "list"}))
        assert secret not in str(history)
        for path in capd_dirs.state_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
        _, seen = await run_turn(pod, "show your env")
    capd_dirs.stop()
    assert secret not in capd_dirs.output()
    (env,) = results(seen)
    assert f'"MY_TOKEN": "{secret}"' in env["output"], "the model asked for it"


@pytest.mark.own_capd
async def test_capd_killed_mid_call_comes_back_with_the_server(
    capd: CapdProcess, mcp_commands: McpServerCommands, tmp_path: Path
) -> None:
    """The turn comes back paused; resume closes the cut call and goes on, with a new
    server, and no server of the killed capd is left."""
    echo = call("mcp__everything__echo", message="after the restart")
    model = scripted(long_call(), echo, {"text": "ok"})
    log = tmp_path / "tap.log"
    await spawn(
        capd,
        "r1",
        model,
        mcp_servers={"everything": tapped(mcp_commands, log)},
        sandbox=tap_sandbox(log),
    )
    async with await connect_pod(capd, "r1") as pod:
        before, server = await start_long_call(pod, log)
    await sigkill(capd)
    capd.start()
    async with await connect_pod(capd, "r1") as pod:
        status = await pod.request({"method": "status"})
        after = await wait_mcp(pod, "everything", ready)
        end, seen = await resume_turn(pod)
    await until(lambda: not alive(before["pid"]) and not alive(server))
    assert status["status"] == "paused"
    assert after["pid"] != before["pid"]
    cut, echoed = results(seen)
    assert cut["is_error"] is True
    assert not echoed["is_error"]
    assert "after the restart" in echoed["output"]
    assert (end["result"], end["output"]) == ("finished", "ok")


POSTED = "Received MCP POST request"
"""What server-everything over Streamable HTTP logs on stdout for each POST it receives."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_http_everything(
    commands: McpServerCommands, port: int, log: Path
) -> subprocess.Popen[bytes]:
    """server-everything over Streamable HTTP on `port`, the test's own process."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*commands.everything, "streamableHttp"],
            env={**os.environ, "PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"server-everything streamableHttp did not listen:\n{log.read_text()}")


@pytest.fixture
def http_servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_streamable_http_server_is_called_and_comes_back(
    capd: CapdProcess,
    mcp_commands: McpServerCommands,
    http_servers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    openai: OpenAITestServer,
) -> None:
    port, log = _free_port(), tmp_path / "http.log"
    http_servers.append(await asyncio.to_thread(_start_http_everything, mcp_commands, port, log))
    for text in ("one", "two", "three"):
        openai.enqueue(
            ToolCallsReply([FunctionCall("mcp__web__echo", {"message": "over http"})]),
            TextReply(text),
        )
    headers = {"Authorization": "Bearer ${CAPD_TEST_MCP_UNSET_TOKEN:-anonymous}"}
    web = {"url": f"http://127.0.0.1:{port}/mcp", "headers": headers}
    await spawn(capd, "w1", openai_model(openai), mcp_servers={"web": web})
    async with await connect_pod(capd, "w1") as pod:
        first = await wait_mcp(pod, "web", ready)
        _, seen_up = await run_turn(pod, "echo")
        http_servers[0].kill()
        await asyncio.to_thread(http_servers[0].wait)
        _, seen_down = await run_turn(pod, "echo")
        down = await wait_mcp(pod, "web", lambda s: s["state"] != "ready")
        http_servers.append(
            await asyncio.to_thread(_start_http_everything, mcp_commands, port, log)
        )
        back = await wait_mcp(pod, "web", ready)
        end, seen_back = await run_turn(pod, "echo")
    assert (first["transport"], first["pid"], first["tools"]) == ("http", None, back["tools"])
    (up,), (lost,), (again,) = results(seen_up), results(seen_down), results(seen_back)
    assert not up["is_error"]
    assert "over http" in up["output"]
    assert lost["is_error"] is True
    assert "MCP server web is unavailable" in lost["output"]
    assert down["state"] in ("failed", "starting")
    assert not again["is_error"]
    assert "over http" in again["output"]
    assert end["output"] == "three"
    # The step after the failed call, while the server was down, still offered its tools.
    offered = [{t["function"]["name"] for t in r["tools"]} for r in openai.requests]
    assert len(offered) == 6
    assert all("mcp__web__echo" in names for names in offered), offered


async def test_a_hung_streamable_http_server_is_failed_then_back(
    capd: CapdProcess,
    mcp_commands: McpServerCommands,
    http_servers: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """A server that stops answering over HTTP: the call times out, the probe after it
    gets no answer, so status.mcp says `failed` while the server still hangs; once it
    answers again capd connects again."""
    port = _free_port()
    log = tmp_path / "log"
    server = await asyncio.to_thread(_start_http_everything, mcp_commands, port, log)
    http_servers.append(server)
    long_call = call(f"mcp__web__{LONG}", duration=30, steps=30)
    echo = call("mcp__web__echo", message="answering again")
    model = scripted(long_call, {"text": "timed out"}, echo, {"text": "answered"})
    web = {"url": f"http://127.0.0.1:{port}/mcp"}
    limits = {"mcp_call_timeout_s": 1}
    await spawn(capd, "hh", model, mcp_servers={"web": web}, limits=limits)
    async with await connect_pod(capd, "hh") as pod:
        before = await wait_mcp(pod, "web", ready)
        posts = log.read_text().count(POSTED)
        await pod.request({"method": "run", "text": "go"})
        # The call's POST reached the server (the pod sends nothing else now); it would
        # run 30 s.
        await until(lambda: log.read_text().count(POSTED) > posts)
        server.send_signal(signal.SIGSTOP)
        timed_out, _ = await wait_for(pod, is_event("tool_result"))
        await wait_for(pod, is_event("turn_end"))
        # 2 s for the probe, 2 s for the old session's DELETE, and some slack.
        hung = await wait_mcp(pod, "web", lambda s: s["state"] != "ready", timeout=PROBE_S + 4)
        server.send_signal(signal.SIGCONT)
        back = await wait_mcp(pod, "web", lambda s: ready(s) and s["restarts"] > 0)
        end, seen = await run_turn(pod, "again")
    assert "did not answer within 1 s" in timed_out["output"]
    assert hung["error"]
    assert back["restarts"] == before["restarts"] + 1
    assert [r["is_error"] for r in results(seen)] == [False]
    assert end["output"] == "answered"
