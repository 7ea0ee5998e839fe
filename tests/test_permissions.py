"""Approvals of a builtin-engine pod's tool calls (docs/protocol.md, Approvals), black-box:
a real capd, scripted (or fake OpenAI) models calling bash and an MCP server's tool, the
questions answered with `permission` and with capctl."""

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from capd.context import INTERRUPTED_TOOL_OUTPUT
from protocol.client import Client
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.fakes.openai_server import FunctionCall, OpenAITestServer, TextReply, ToolCallsReply
from tests.helpers import (
    EVENT_TIMEOUT_S,
    Event,
    connect_pod,
    full_history,
    is_event,
    run_turn,
    scripted,
    sigkill,
    spawn,
    wait_for,
)
from tests.mcp_servers import McpServerCommands

pytestmark = pytest.mark.shared_capd

TAP = Path(__file__).parent / "fakes" / "mcp_tap.py"
REJECTED = "the user rejected this call: not run"
ASK_TOUCH = {"rules": [{"tool": "bash", "match": "touch *", "action": "ask"}]}
OPTION_IDS = ["allow_once", "allow_always", "reject_once"]
MCP_READY_S = 20.0


def bash(*commands: str) -> dict[str, Any]:
    """A scripted step that runs each command with bash."""
    return {"tool_calls": [{"name": "bash", "arguments": {"command": c}} for c in commands]}


async def spawn_asking(capd: CapdProcess, name: str, cwd: Path, *steps: dict[str, Any]) -> None:
    """A pod that asks before any `touch`."""
    model = scripted(*steps)
    await spawn(capd, name, model, cwd=str(cwd), tools=["bash"], permissions=ASK_TOUCH)


async def answer(pod: Client, asked: Event, option_id: str | None) -> Event:
    """Answer the question; its permission_resolved."""
    request_id = asked["request_id"]
    await pod.request({"method": "permission", "request_id": request_id, "option_id": option_id})
    resolved, _ = await wait_for(pod, is_event("permission_resolved", request_id=request_id))
    return resolved


def results(seen: list[Event]) -> list[Event]:
    return [e for e in seen if e["event"] == "tool_result"]


async def capctl(capd: CapdProcess, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "capctl", "--runtime-dir", str(capd.runtime_dir), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), EVENT_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_a_denied_call_is_not_run_and_the_model_reads_why(
    capd: CapdProcess, tmp_path: Path
) -> None:
    (tmp_path / "keep").write_text("kept")
    permissions = {
        "default": "deny",
        "rules": [
            {"tool": "bash", "match": "rm *", "action": "deny"},
            {"tool": "bash", "action": "allow"},
        ],
    }
    async with OpenAITestServer() as server:
        server.enqueue(
            ToolCallsReply([FunctionCall("bash", {"command": "rm -f keep"})]),
            ToolCallsReply([FunctionCall("read_file", {"path": "keep"})]),
            TextReply("I may not."),
        )
        model = {"provider": "openai", "name": "m", "base_url": server.base_url}
        await spawn(
            capd,
            "d1",
            model,
            cwd=str(tmp_path),
            tools=["bash", "read_file"],
            permissions=permissions,
        )
        async with await connect_pod(capd, "d1") as pod:
            end, seen = await run_turn(pod, "clean up")
        denied, by_default = results(seen)
        second, third = server.requests[1]["messages"], server.requests[2]["messages"]
    assert (tmp_path / "keep").read_text() == "kept"
    assert (denied["output"], denied["is_error"]) == (
        "denied by permissions rule 0 (tool bash, match rm *): not run",
        True,
    )
    assert (by_default["output"], by_default["is_error"]) == (
        "denied by permissions.default: not run",
        True,
    )
    assert second[-1]["role"] == "tool"
    assert second[-1]["content"] == denied["output"]
    assert third[-1]["content"] == by_default["output"]
    assert (end["result"], end["output"]) == ("finished", "I may not.")
    assert not [e for e in seen if e["event"].startswith("permission")]


async def test_allow_once_runs_the_call_it_was_asked_about(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn_asking(capd, "a1", tmp_path, bash("touch made"), {"text": "done"})
    async with await connect_pod(capd, "a1") as pod:
        await pod.request({"method": "run", "text": "go"})
        asked, seen = await wait_for(pod, is_event("permission_request"))
        waiting = await pod.request({"method": "status"})
        made_before = (tmp_path / "made").exists()
        resolved = await answer(pod, asked, "allow_once")
        end, after = await wait_for(pod, is_event("turn_end"))
    (call,) = next(e for e in seen if e["event"] == "assistant_message")["tool_calls"]
    assert "seq" in asked
    assert asked["tool_call"] == {
        "toolCallId": call["id"],
        "title": "bash: touch made",
        "rawInput": {"command": "touch made"},
    }
    assert [o["optionId"] for o in asked["options"]] == OPTION_IDS
    assert [o["kind"] for o in asked["options"]] == OPTION_IDS
    question = {key: asked[key] for key in ("request_id", "turn_id", "tool_call", "options")}
    assert (waiting["status"], waiting["permissions"]) == ("running", [question])
    assert not made_before
    assert (resolved["option_id"], resolved["grant"]) == ("allow_once", None)
    assert (tmp_path / "made").exists()
    (result,) = results(after)
    assert (result["call_id"], result["is_error"]) == (call["id"], False)
    assert (end["result"], end["output"]) == ("finished", "done")


async def test_a_rejected_call_is_not_run(capd: CapdProcess, tmp_path: Path) -> None:
    """reject_once, and `permission` with no option, both refuse the call."""
    await spawn_asking(capd, "r1", tmp_path, bash("touch one", "touch two"), {"text": "no"})
    async with await connect_pod(capd, "r1") as pod:
        await pod.request({"method": "run", "text": "go"})
        first, _ = await wait_for(pod, is_event("permission_request"))
        with pytest.raises(ProtocolError) as unoffered:
            await pod.request(
                {"method": "permission", "request_id": first["request_id"], "option_id": "maybe"}
            )
        rejected = await answer(pod, first, "reject_once")
        second, _ = await wait_for(pod, is_event("permission_request"))
        cancelled = await answer(pod, second, None)
        end, seen = await wait_for(pod, is_event("turn_end"))
        with pytest.raises(ProtocolError) as stale:
            await pod.request({"method": "permission", "request_id": first["request_id"]})
    assert unoffered.value.code == "invalid_request"
    assert "maybe is not one of allow_once, allow_always, reject_once" in str(unoffered.value)
    assert (rejected["option_id"], cancelled["option_id"]) == ("reject_once", None)
    assert second["tool_call"]["title"] == "bash: touch two"
    assert [(r["output"], r["is_error"]) for r in results(seen)] == [(REJECTED, True)]
    assert not (tmp_path / "one").exists()
    assert not (tmp_path / "two").exists()
    assert (end["result"], end["output"]) == ("finished", "no")
    assert stale.value.code == "not_found"


@pytest.mark.own_capd
async def test_allow_always_lets_the_rule_run_and_outlives_a_restart(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn_asking(
        capd,
        "w1",
        tmp_path,
        bash("touch one"),
        bash("touch two"),
        {"text": "first done"},
        bash("touch three", "echo unasked"),
        {"text": "second done"},
    )
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
        resolved = await answer(pod, asked, "allow_always")
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert resolved["grant"] == {"rule": 0, "tool": "bash"}
    assert (end["result"], end["output"]) == ("finished", "first done")
    assert [e["event"] for e in seen].count("permission_request") == 0
    assert (tmp_path / "one").exists()
    assert (tmp_path / "two").exists()

    capd.stop()
    capd.start()
    async with await connect_pod(capd, "w1") as pod:
        end, seen = await run_turn(pod, "again")
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "second done")
    assert (tmp_path / "three").exists()
    assert [r["is_error"] for r in results(seen)] == [False, False]
    assert [e["event"] for e in history].count("permission_request") == 1


async def test_a_pause_closes_the_question_and_the_pod_goes_on(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn_asking(capd, "p1", tmp_path, bash("touch never"), {"text": "after"})
    async with await connect_pod(capd, "p1") as pod:
        await pod.request({"method": "run", "text": "go"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
        await pod.request({"method": "pause"})
        _, paused = await wait_for(pod, is_event("status", status="paused"))
        status = await pod.request({"method": "status"})
        with pytest.raises(ProtocolError) as gone:
            await answer(pod, asked, "allow_once")
        await pod.request({"method": "resume"})
        end, resumed = await wait_for(pod, is_event("turn_end"))
        later, _ = await run_turn(pod, "next")
    resolved = [e for e in paused if e["event"] == "permission_resolved"]
    assert [(e["request_id"], e["option_id"]) for e in resolved] == [(asked["request_id"], None)]
    assert status["permissions"] == []
    assert gone.value.code == "not_found"
    assert [(r["output"], r["is_error"]) for r in results(resumed)] == [
        (INTERRUPTED_TOOL_OUTPUT, True)
    ]
    assert (end["result"], end["output"]) == ("finished", "after")
    assert not (tmp_path / "never").exists()
    assert (later["result"], later["output"]) == ("finished", "You said: next")


@pytest.mark.own_capd
async def test_a_question_open_when_capd_died_is_closed_and_the_turn_resumes(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn_asking(capd, "k2", tmp_path, bash("touch never"), {"text": "after"})
    async with await connect_pod(capd, "k2") as pod:
        await pod.request({"method": "run", "text": "go"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
    await sigkill(capd)
    capd.start()
    async with await connect_pod(capd, "k2") as pod:
        status = await pod.request({"method": "status"})
        await pod.request({"method": "resume"})
        end, resumed = await wait_for(pod, is_event("turn_end"))
        history = await full_history(pod)
    resolved = [e for e in history if e["event"] == "permission_resolved"]
    assert [(e["request_id"], e["option_id"]) for e in resolved] == [(asked["request_id"], None)]
    assert (status["status"], status["permissions"]) == ("paused", [])
    assert [r["output"] for r in results(resumed)] == [INTERRUPTED_TOOL_OUTPUT]
    assert (end["result"], end["output"]) == ("finished", "after")
    assert not (tmp_path / "never").exists()


async def test_a_cancel_closes_the_question(capd: CapdProcess, tmp_path: Path) -> None:
    await spawn_asking(capd, "c1", tmp_path, bash("touch never"))
    async with await connect_pod(capd, "c1") as pod:
        await pod.request({"method": "run", "text": "go"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
        await pod.request({"method": "cancel"})
        end, seen = await wait_for(pod, is_event("turn_end"))
    resolved = [e for e in seen if e["event"] == "permission_resolved"]
    assert [(e["request_id"], e["option_id"]) for e in resolved] == [(asked["request_id"], None)]
    assert end["result"] == "cancelled"
    assert not (tmp_path / "never").exists()


async def test_a_pod_whose_permissions_never_ask_refuses_permission(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn(capd, "n1", scripted(), cwd=str(tmp_path))
    async with await connect_pod(capd, "n1", subscribe=False) as pod:
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "permission", "request_id": "perm-1"})
    assert refused.value.code == "invalid_request"
    assert "no rule of its permissions, nor their default, says ask" in str(refused.value)


async def test_an_mcp_tool_waits_for_its_answer_before_the_server_hears_of_it(
    capd: CapdProcess, mcp_commands: McpServerCommands, tmp_path: Path
) -> None:
    log = tmp_path / "tap.log"
    server = {"command": sys.executable, "args": [str(TAP), str(log), *mcp_commands.time]}
    call = {"name": "mcp__time__get_current_time", "arguments": {"timezone": "UTC"}}
    await spawn(
        capd,
        "m1",
        scripted({"tool_calls": [call]}, {"text": "it is late"}),
        cwd=str(tmp_path),
        mcp_servers={"time": server},
        permissions={"rules": [{"tool": "mcp__*", "action": "ask"}]},
    )
    async with await connect_pod(capd, "m1") as pod:
        await pod.request({"method": "run", "text": "what time is it"})
        asked, _ = await wait_for(pod, is_event("permission_request"), timeout=MCP_READY_S)
        heard_before = log.read_text().splitlines()
        await answer(pod, asked, "allow_once")
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert asked["tool_call"]["title"] == 'mcp__time__get_current_time {"timezone":"UTC"}'
    assert asked["tool_call"]["rawInput"] == {"timezone": "UTC"}
    assert "tools/call get_current_time" not in heard_before
    assert "tools/call get_current_time" in log.read_text().splitlines()
    (result,) = results(seen)
    assert result["is_error"] is False
    assert "UTC" in result["output"]
    assert end["output"] == "it is late"


async def test_capctl_shows_and_answers_a_question(capd: CapdProcess, tmp_path: Path) -> None:
    await spawn_asking(capd, "k1", tmp_path, bash("touch by-capctl"), {"text": "done"})
    watch = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "capctl", "--runtime-dir", str(capd.runtime_dir)),
        *("watch", "k1", "--from-seq", "0"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        async with await connect_pod(capd, "k1") as pod:
            await pod.request({"method": "run", "text": "go"})
            asked, _ = await wait_for(pod, is_event("permission_request"))
            request_id = asked["request_id"]
            shown = await capctl(capd, "status", "k1")
            watched = await _line_with(watch, "permission asked:")
            answered = await capctl(capd, "permission", "k1", request_id, "allow_once")
            end, _ = await wait_for(pod, is_event("turn_end"))
    finally:
        watch.terminate()
        await watch.wait()
    question = (
        "bash: touch by-capctl; options: allow_once, allow_always, reject_once "
        f"— capctl permission k1 {request_id} OPTION"
    )
    assert "status:      running (waiting for permission)\n" in shown
    assert f"permissions: {request_id}: {question}\n" in shown
    assert watched.strip() == f"permission asked: {question}"
    assert answered.strip() == f"answered {request_id}: allow_once"
    assert (tmp_path / "by-capctl").exists()
    assert end["output"] == "done"


async def _line_with(proc: asyncio.subprocess.Process, needle: str) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        while needle not in (line := (await proc.stdout.readline()).decode()):
            assert line, f"capctl watch ended before {needle!r}"
    return line


async def test_an_mcp_call_that_cannot_run_gets_its_error_without_a_question(
    capd: CapdProcess, mcp_commands: McpServerCommands, tmp_path: Path
) -> None:
    """A tool its server does not list, and a server that is down, get their error at once:
    nobody is asked about a call that could not run (it used to ask first)."""
    servers = {
        "time": {"command": mcp_commands.time[0], "args": mcp_commands.time[1:]},
        "dead": {"command": "false"},
    }
    bogus = {"name": "mcp__time__bogus", "arguments": {}}
    down = {"name": "mcp__dead__anything", "arguments": {}}
    good = {"name": "mcp__time__get_current_time", "arguments": {"timezone": "UTC"}}
    await spawn(
        capd,
        "m2",
        scripted({"tool_calls": [bogus, down]}, {"tool_calls": [good]}, {"text": "done"}),
        cwd=str(tmp_path),
        mcp_servers=servers,
        permissions={"default": "ask"},
    )
    async with await connect_pod(capd, "m2") as pod:
        await pod.request({"method": "run", "text": "what time is it"})
        asked, before = await wait_for(pod, is_event("permission_request"), timeout=MCP_READY_S)
        await answer(pod, asked, "allow_once")
        end, _ = await wait_for(pod, is_event("turn_end"))
    assert asked["tool_call"]["title"] == 'mcp__time__get_current_time {"timezone":"UTC"}'
    not_offered, unavailable = results(before)
    assert not_offered["is_error"] is True
    assert not_offered["output"].startswith(
        "tool mcp__time__bogus is not offered now: MCP server time does not list it (it "
        "offers: mcp__time__get_current_time"
    )
    assert unavailable["is_error"] is True
    assert unavailable["output"].startswith("MCP server dead is unavailable: ")
    assert end["output"] == "done"
