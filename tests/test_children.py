"""Child pods (docs/protocol.md: pod tools, parent reports) through a real capd.

The model side is the local OpenAI-compatible server, with one reply queue per model name
so a parent and its child each get their own replies; a `HeldReply` holds the child's
answer until the test lets it go, which fixes the order of events across the two pods
without sleeping. A parent that is not a capd pod is played by `ParentSocket`.
"""

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protocol.client import Client
from protocol.errors import ProtocolError
from tests.conftest import BOTH_STORES, CapdProcess
from tests.fakes.openai_server import (
    FunctionCall,
    OpenAITestServer,
    TextReply,
    ToolCallsReply,
)
from tests.fakes.parent_socket import ParentSocket
from tests.fakes.sse_server import HeldReply
from tests.helpers import (
    Event,
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    scripted,
    sleeper,
    spawn,
    wait_for,
)
from tests.mcp_servers import McpServerCommands

POD_TOOLS = ["spawn_pod", "send_to_pod", "read_pod_output", "stop_pod", "list_pods"]
pytestmark = pytest.mark.shared_capd


@pytest.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as srv:
        yield srv


def _model(server: OpenAITestServer, name: str) -> dict[str, object]:
    return {"provider": "openai", "name": name, "base_url": server.base_url}


async def _status(capd: CapdProcess, name: str) -> dict[str, Any]:
    async with await connect_pod(capd, name, subscribe=False) as pod:
        return await pod.request({"method": "status"})


async def _history(capd: CapdProcess, name: str) -> list[Event]:
    async with await connect_pod(capd, name, subscribe=False) as pod:
        return await full_history(pod)


def _tool_results(events: list[Event]) -> dict[str, Event]:
    return {e["call_id"]: e for e in events if e["event"] == "tool_result"}


def _is_shut_down(event: Event) -> bool:
    return event["event"] == "pod_event_received" and event["payload"]["kind"] == "shut_down"


async def _spawn_child(
    capd: CapdProcess,
    name: str,
    parent: str,
    model: dict[str, Any],
    cwd: Path | None = None,
    **manifest: Any,
) -> None:
    """Spawn `name` with `parent` on the daemon socket, as `capctl spawn --parent` does."""
    if cwd is not None:
        manifest["cwd"] = str(cwd)
    await daemon_request(
        capd,
        {
            "method": "spawn",
            "manifest": {"name": name, "model": model, **manifest},
            "parent": str(capd.pod_socket(parent)),
        },
    )


async def _wait_idle(pod: Client) -> list[Event]:
    _, seen = await wait_for(pod, is_event("status", status="idle"))
    return seen


async def test_a_spawned_child_runs_reports_and_wakes_its_parent(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    kid_answers = asyncio.Event()
    server.enqueue(
        ToolCallsReply(
            [
                FunctionCall(
                    "spawn_pod",
                    {
                        "name": "kid",
                        "task": "find the answer",
                        "tools": ["read_file"],
                        "cwd": "sub",
                        "model": {"name": "kid-model"},
                    },
                    id="call_spawn",
                )
            ]
        ),
        TextReply("I asked kid."),
        TextReply("kid found 42."),
        model="boss-model",
    )
    server.enqueue(HeldReply(TextReply("The answer is 42."), kid_answers), model="kid-model")
    await spawn(
        capd,
        "boss",
        _model(server, "boss-model"),
        cwd=str(tmp_path),
        tools=["read_file", *POD_TOOLS],
        system_prompt="You lead.",
    )
    async with await connect_pod(capd, "boss") as boss:
        first = await boss.request({"method": "run", "text": "split the work"})
        spawned, _ = await wait_for(boss, is_event("child_spawned"))
        result, _ = await wait_for(boss, is_event("tool_result"))
        end, _ = await wait_for(boss, is_event("turn_end"))
        assert (end["turn_id"], end["output"]) == (first["turn_id"], "I asked kid.")
        kid_answers.set()
        received, _ = await wait_for(boss, is_event("pod_event_received"))
        start, _ = await wait_for(boss, is_event("turn_start"))
        note, _ = await wait_for(boss, is_event("notification"))
        woke, _ = await wait_for(boss, is_event("turn_end"))

    assert spawned["name"] == "kid"
    assert spawned["turn_id"] == first["turn_id"]
    assert spawned["socket"] == str(capd.pod_socket("kid"))
    assert result["is_error"] is False
    assert "spawned pod kid" in result["output"]
    kid = await _status(capd, "kid")
    assert kid["parent"] == str(capd.pod_socket("boss"))
    assert kid["cwd"] == str(tmp_path / "sub")
    assert kid["tools"] == ["read_file"]
    assert kid["model"] == "openai/kid-model"
    kid_request = server.requests_for("kid-model")[0]
    assert kid_request["messages"] == [
        {"role": "system", "content": "You lead."},
        {"role": "user", "content": "find the answer"},
    ]
    assert [t["function"]["name"] for t in kid_request["tools"]] == ["read_file"]

    payload = received["payload"]
    assert payload["kind"] == "turn_ended"
    assert payload["pod"] == "kid"
    assert (payload["result"], payload["output"]) == ("finished", "The answer is 42.")
    assert start["invoke"] == "pod_event"
    assert note["source"] == "pod kid"
    assert note["pod_event_seq"] == received["seq"]
    assert "The answer is 42." in note["text"]
    assert woke["output"] == "kid found 42."
    woken_request = server.requests_for("boss-model")[2]
    assert "The answer is 42." in woken_request["messages"][-1]["content"]
    assert (await _status(capd, "boss"))["children"] == ["kid"]


async def test_comm_tools_read_message_and_stop_a_child(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    first_answer, second_answer = asyncio.Event(), asyncio.Event()
    server.enqueue(
        ToolCallsReply(
            [FunctionCall("spawn_pod", {"name": "kid", "task": "count", "model": {"name": "kid"}})]
        ),
        TextReply("spawned"),
        ToolCallsReply(
            [
                FunctionCall("read_pod_output", {"name": "kid"}, id="read1"),
                FunctionCall("list_pods", {}, id="list"),
                FunctionCall("send_to_pod", {"name": "kid", "text": "go on"}, id="send"),
            ]
        ),
        TextReply("asked for more"),
        ToolCallsReply(
            [
                FunctionCall("read_pod_output", {"name": "kid"}, id="read2"),
                FunctionCall("stop_pod", {"name": "kid"}, id="stop"),
                FunctionCall("read_pod_output", {"name": "kid"}, id="read3"),
            ]
        ),
        TextReply("all done"),
        model="boss",
    )
    server.enqueue(
        HeldReply(TextReply("1 2 3"), first_answer),
        HeldReply(TextReply("4 5"), second_answer),
        model="kid",
    )
    await spawn(capd, "boss", _model(server, "boss"), cwd=str(tmp_path), tools=POD_TOOLS)
    async with await connect_pod(capd, "boss") as boss:
        await boss.request({"method": "run", "text": "start"})
        await _wait_idle(boss)
        first_answer.set()
        second = await _wait_idle(boss)
        second_answer.set()
        third = await _wait_idle(boss)
        if not any(_is_shut_down(e) for e in third):
            await wait_for(boss, _is_shut_down)

    results = _tool_results(second)
    assert "1 2 3" in results["read1"]["output"]
    assert results["list"]["output"].startswith("- kid (")
    assert "started turn" in results["send"]["output"]
    results = _tool_results(third)
    assert "4 5" in results["read2"]["output"]
    assert "1 2 3" not in results["read2"]["output"]
    assert results["stop"]["output"].startswith("stopped pod kid")
    assert "stopped" in results["read3"]["output"]
    assert "nothing new" in results["read3"]["output"]
    assert not any(r["is_error"] for r in [*_tool_results(second).values(), *results.values()])
    listing = await daemon_request(capd, {"method": "list"})
    assert {p["name"]: p["status"] for p in listing["pods"]}["kid"] == "stopped"


async def test_escapes_and_strangers_are_refused_as_tool_errors(
    capd: CapdProcess, tmp_path: Path
) -> None:
    home = tmp_path / "boss"
    home.mkdir()
    (home / "link").symlink_to(tmp_path)
    await spawn(capd, "stranger", scripted())
    attempts = {
        "outside": ("spawn_pod", {"name": "c1", "task": "x", "cwd": str(tmp_path)}),
        "dotdot": ("spawn_pod", {"name": "c2", "task": "x", "cwd": "../elsewhere"}),
        "symlink": ("spawn_pod", {"name": "c3", "task": "x", "cwd": "link/x"}),
        "tools": ("spawn_pod", {"name": "c4", "task": "x", "tools": ["bash", "read_file"]}),
        "key": ("spawn_pod", {"name": "c5", "task": "x", "model": {"api_key_env": "HOME"}}),
        "url": ("spawn_pod", {"name": "c6", "task": "x", "model": {"base_url": "http://x"}}),
        "name": ("spawn_pod", {"name": "Bad Name", "task": "x"}),
        "taken": ("spawn_pod", {"name": "stranger", "task": "x"}),
        "ok": ("spawn_pod", {"name": "kid", "task": "x", "model": {"script": [{"text": "k"}]}}),
        "many": ("spawn_pod", {"name": "c7", "task": "x"}),
        "send": ("send_to_pod", {"name": "stranger", "text": "hi"}),
        "read": ("read_pod_output", {"name": "stranger"}),
        "stop": ("stop_pod", {"name": "stranger"}),
    }
    calls = [{"name": tool, "arguments": args} for tool, args in attempts.values()]
    await spawn(
        capd,
        "boss",
        scripted({"tool_calls": calls}, {"text": "done"}),
        cwd=str(home),
        tools=["read_file", *POD_TOOLS],
        limits={"max_children": 1},
    )
    async with await connect_pod(capd, "boss") as boss:
        await boss.request({"method": "run", "text": "try"})
        _, seen = await wait_for(boss, is_event("turn_end"))
    outputs = dict(zip(attempts, [e for e in seen if e["event"] == "tool_result"], strict=True))
    refused = {key: e["output"] for key, e in outputs.items() if e["is_error"]}
    assert set(refused) == set(attempts) - {"ok"}, outputs
    for key in ("outside", "dotdot", "symlink"):
        assert "outside the working directory" in refused[key]
    assert "tools bash are not among parent pod boss's tools" in refused["tools"]
    assert "leave api_key_env out" in refused["key"]
    assert "leave base_url out" in refused["url"]
    assert "name: String should match pattern" in refused["name"]
    assert "limits.max_children=1" in refused["many"]
    assert "already exists" in refused["taken"]
    for key in ("send", "read", "stop"):
        assert "stranger is not one of your child pods" in refused[key]
    listing = await daemon_request(capd, {"method": "list"})
    assert sorted(p["name"] for p in listing["pods"]) == ["boss", "kid", "stranger"]
    assert not (tmp_path / "x").exists()
    assert (await _status(capd, "stranger"))["status"] == "idle"


@BOTH_STORES
@pytest.mark.own_capd
async def test_reports_survive_a_restart_and_an_absent_parent_and_arrive_once(
    capd: CapdProcess,
) -> None:
    parent = ParentSocket(capd.runtime_dir / "parent.sock")
    script = scripted({"text": "one"}, {"text": "two"}, {"error": "boom"})
    await daemon_request(
        capd,
        {
            "method": "spawn",
            "manifest": {"name": "kid", "model": script},
            "parent": str(parent.path),
        },
    )
    turns = []
    async with await connect_pod(capd, "kid") as kid:
        turns.append((await kid.request({"method": "run", "text": "a"}))["turn_id"])
        await _wait_idle(kid)
        await kid.request({"method": "notify", "text": "a note starts a silent turn"})
        await _wait_idle(kid)
        turns.append((await kid.request({"method": "run", "text": "b"}))["turn_id"])
        await _wait_idle(kid)
    capd.stop()
    capd.start()

    parent.hang_up_before_ack = 2
    await parent.start()
    reports = await parent.wait_reports(2)
    await parent.stop()
    async with await connect_pod(capd, "kid") as kid:
        turns.append((await kid.request({"method": "run", "text": "c"}))["turn_id"])
        await _wait_idle(kid)
    await parent.start()
    reports = await parent.wait_reports(3)
    await daemon_request(capd, {"method": "stop", "name": "kid"})
    reports = await parent.wait_reports(4)
    await parent.stop()

    assert [r["kind"] for r in reports] == ["turn_ended", "errored", "errored", "shut_down"]
    assert [r.get("turn_id") for r in reports[:3]] == turns
    assert (reports[0]["result"], reports[0]["output"]) == ("finished", "one")
    assert reports[1]["message"] == reports[2]["message"] == "model call failed: scripted: boom"
    assert {r["pod"] for r in reports} == {"kid"}
    assert len(parent.deliveries) >= len(reports) + 2, "the unacked reports came again"
    assert parent.unexpected == []


@pytest.mark.own_capd
async def test_a_report_held_by_a_paused_parent_survives_sigkill(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn(capd, "boss", sleeper("ok"), cwd=str(tmp_path), tools=["bash"])
    await _spawn_child(capd, "kid", "boss", scripted({"text": "kid is done"}), tmp_path)
    async with await connect_pod(capd, "boss") as boss:
        turn = (await boss.request({"method": "run", "text": "go"}))["turn_id"]
        await wait_for(boss, is_event("assistant_message"))
        await boss.request({"method": "pause"})
        async with await connect_pod(capd, "kid", subscribe=False) as kid:
            await kid.request({"method": "run", "text": "work"})
        received, _ = await wait_for(boss, is_event("pod_event_received"))
    capd.proc.kill()
    await asyncio.to_thread(capd.proc.wait, 10)
    capd.start()

    async with await connect_pod(capd, "boss") as boss:
        status = await boss.request({"method": "status"})
        assert (status["status"], status["turn_id"]) == ("paused", turn)
        await boss.request({"method": "resume"})
        end, seen = await wait_for(boss, is_event("turn_end"))
    notes = [e for e in seen if e["event"] == "notification"]
    assert [n["pod_event_seq"] for n in notes] == [received["seq"]]
    assert "kid is done" in notes[0]["text"]
    assert (end["turn_id"], end["result"], end["output"]) == (turn, "finished", "ok")
    history = await _history(capd, "boss")
    assert [e["event"] for e in history].count("pod_event_received") == 1


async def test_stop_and_delete_reach_descendants_and_ps_shows_the_tree(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn(capd, "boss", scripted(), cwd=str(tmp_path))
    for child, parent in (("kid", "boss"), ("grandkid", "kid"), ("other", "boss")):
        await _spawn_child(capd, child, parent, scripted(), tmp_path)
    ps = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "capctl", "--runtime-dir", str(capd.runtime_dir), "ps"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    names = [line.split()[0] for line in ps.stdout.splitlines()[1:]]
    indents = [len(line) - len(line.lstrip()) for line in ps.stdout.splitlines()[1:]]
    assert list(zip(names, indents, strict=True)) == [
        ("boss", 0),
        ("kid", 2),
        ("grandkid", 4),
        ("other", 2),
    ]
    assert (await _status(capd, "boss"))["children"] == ["kid", "other"]

    await daemon_request(capd, {"method": "stop", "name": "kid"})
    listing = await daemon_request(capd, {"method": "list"})
    stopped = {p["name"] for p in listing["pods"] if p["status"] == "stopped"}
    assert stopped == {"kid", "grandkid"}

    # The pod's own `stop` stops it first, then `other`, whose shut_down report to the
    # stopped boss then waits in the outbox; deleting boss drops it.
    async with await Client.connect(capd.socket) as daemon:
        await daemon.request({"method": "subscribe"})
        async with await connect_pod(capd, "boss", subscribe=False) as boss:
            await boss.request({"method": "stop"})
        await wait_for(daemon, is_event("pod_stopped", pod="other"))
        await daemon.request({"method": "delete", "name": "boss"})
        listing = await daemon.request({"method": "list"})
    pods = {p["name"]: p for p in listing["pods"]}
    assert {name: p["status"] for name, p in pods.items()} == {
        "kid": "stopped",
        "grandkid": "stopped",
        "other": "stopped",
    }
    assert pods["kid"]["parent"] is None
    assert pods["other"]["parent"] is None
    assert pods["grandkid"]["parent"] == str(capd.pod_socket("kid"))

    # A new pod named boss gets none of the reports owed to the deleted one: delivery to
    # one parent is in order, so its first report is from its own new child.
    await spawn(capd, "boss", scripted(), cwd=str(tmp_path))
    await _spawn_child(capd, "newkid", "boss", scripted(), tmp_path)
    async with await connect_pod(capd, "boss") as boss:
        async with await connect_pod(capd, "newkid", subscribe=False) as kid:
            await kid.request({"method": "run", "text": "hi"})
        received, _ = await wait_for(boss, is_event("pod_event_received"))
    assert received["payload"]["pod"] == "newkid"


@pytest.mark.own_capd
async def test_sigterm_sends_no_shut_down_and_children_resume_reporting(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn(capd, "boss", scripted(), cwd=str(tmp_path), tools=["bash"])
    await _spawn_child(capd, "kid", "boss", sleeper("done"), tmp_path, tools=["bash"])
    async with await connect_pod(capd, "kid") as kid:
        turn = (await kid.request({"method": "run", "text": "long job"}))["turn_id"]
        await wait_for(kid, is_event("assistant_message"))
    assert await asyncio.to_thread(capd.signal, signal.SIGTERM) == 0
    capd.start()
    assert (await _status(capd, "kid"))["status"] == "paused"
    async with await connect_pod(capd, "boss") as boss:
        async with await connect_pod(capd, "kid", subscribe=False) as kid:
            await kid.request({"method": "resume"})
        received, _ = await wait_for(boss, is_event("pod_event_received"))
    assert received["payload"]["kind"] == "turn_ended"
    assert received["payload"]["turn_id"] == turn
    assert received["payload"]["output"] == "done"
    history = await _history(capd, "boss")
    assert [e["payload"]["kind"] for e in history if e["event"] == "pod_event_received"] == [
        "turn_ended"
    ]


async def test_client_spawned_children_obey_the_child_rules(
    capd: CapdProcess, tmp_path: Path
) -> None:
    home = tmp_path / "boss"
    sub = home / "sub"
    sub.mkdir(parents=True)
    server = {"command": "mcp-server-nowhere", "args": ["--fast"]}
    mcp = {"mcp_servers": {"ev": server, "rel": {"command": "./bin/srv"}}}
    await spawn(capd, "boss", scripted(), cwd=str(home), tools=["read_file"], **mcp)
    refusals = {
        "outside": ({"cwd": str(tmp_path)}, "forbidden", "is outside"),
        "tools": ({"cwd": str(home), "tools": ["bash"]}, "forbidden", "tools bash"),
        "mcp-name": (
            {"cwd": str(home), "mcp_servers": {"other": server}},
            "forbidden",
            "mcp_servers other are not among parent pod boss's MCP servers (ev, rel)",
        ),
        "mcp-definition": (
            {"cwd": str(home), "mcp_servers": {"ev": {**server, "args": ["--evil"]}}},
            "forbidden",
            "mcp_servers ev are not among parent pod boss's MCP servers (ev, rel) as it",
        ),
        # The same text, but in the child's cwd it names <sub>/bin/srv, another program.
        "mcp-relative": (
            {"cwd": str(sub), "mcp_servers": {"rel": {"command": "./bin/srv"}}},
            "forbidden",
            "mcp_servers rel are not among",
        ),
    }
    for name, (extra, code, needle) in refusals.items():
        with pytest.raises(ProtocolError) as refused:
            await _spawn_child(capd, name, "boss", scripted(), **extra)
        message = refused.value.message
        assert (refused.value.code, needle in message) == (code, True), (name, message)
    same = {"ev": {"type": "stdio", **server}, "rel": {"command": "../bin/srv"}}
    await _spawn_child(capd, "kid", "boss", scripted(), sub, mcp_servers=same)
    listing = await daemon_request(capd, {"method": "list"})
    assert sorted(p["name"] for p in listing["pods"]) == ["boss", "kid"]


async def test_send_to_pod_queues_behind_a_busy_child_and_waits_for_a_paused_one(
    capd: CapdProcess, tmp_path: Path
) -> None:
    messages = [
        {"tool_calls": [{"name": "send_to_pod", "arguments": {"name": "kid", "text": "a"}}]},
        {"text": "sent a"},
        {"tool_calls": [{"name": "send_to_pod", "arguments": {"name": "kid", "text": "b"}}]},
        {"text": "sent b"},
    ]
    boss_tools = ["bash", "send_to_pod"]
    await spawn(capd, "boss", scripted(*messages), cwd=str(tmp_path), tools=boss_tools)
    await _spawn_child(capd, "kid", "boss", sleeper("slept"), tmp_path, tools=["bash"])
    async with await connect_pod(capd, "kid") as kid, await connect_pod(capd, "boss") as boss:
        busy_turn = (await kid.request({"method": "run", "text": "sleep"}))["turn_id"]
        await wait_for(kid, is_event("assistant_message"))
        await boss.request({"method": "run", "text": "send a"})
        _, first = await wait_for(boss, is_event("turn_end"))
        await kid.request({"method": "pause"})
        await boss.request({"method": "run", "text": "send b"})
        _, second = await wait_for(boss, is_event("turn_end"))
        kid_status = await kid.request({"method": "status"})
        await kid.request({"method": "resume"})
        note, _ = await wait_for(kid, is_event("notification"))

    queued = next(e for e in first if e["event"] == "tool_result")["output"]
    assert "is busy; your message is queued" in queued
    buffered = next(e for e in second if e["event"] == "tool_result")["output"]
    assert "is paused; it reads your message when it is resumed" in buffered
    assert (kid_status["status"], kid_status["turn_id"], kid_status["queued"]) == (
        "paused",
        busy_turn,
        1,
    )
    assert (note["turn_id"], note["source"], note["text"]) == (busy_turn, "pod boss", "b")


async def test_limits_max_depth_bounds_a_family_tree(capd: CapdProcess, tmp_path: Path) -> None:
    grandkid = {"name": "spawn_pod", "arguments": {"name": "grandkid", "task": "x"}}
    kid_model = {"script": [{"tool_calls": [grandkid]}, {"text": "kid done"}]}
    kid = {"name": "spawn_pod", "arguments": {"name": "kid", "task": "go", "model": kid_model}}
    await spawn(
        capd,
        "boss",
        scripted({"tool_calls": [kid]}, {"text": "boss done"}),
        cwd=str(tmp_path),
        tools=["spawn_pod"],
        limits={"max_depth": 1},
    )
    async with await connect_pod(capd, "boss") as boss:
        await boss.request({"method": "run", "text": "go"})
        received, _ = await wait_for(boss, is_event("pod_event_received"))
    assert received["payload"]["output"] == "kid done"
    refused = next(e for e in await _history(capd, "kid") if e["event"] == "tool_result")
    assert refused["is_error"] is True
    assert "would be 2 levels deep, more than its limits.max_depth=1" in refused["output"]
    listing = await daemon_request(capd, {"method": "list"})
    assert sorted(p["name"] for p in listing["pods"]) == ["boss", "kid"]


def _stored_manifest(capd: CapdProcess, name: str) -> dict[str, Any]:
    with sqlite3.connect(capd.state_dir / "capd.db") as db:
        (row,) = db.execute("SELECT manifest FROM pods WHERE name = ?", (name,))
    return dict(json.loads(row[0]))


async def test_spawn_pod_gives_a_child_the_mcp_servers_it_picks_from_its_parents(
    capd: CapdProcess, tmp_path: Path, mcp_commands: McpServerCommands
) -> None:
    node, script = mcp_commands.everything
    # b's command is relative to boss's cwd; its children work in sub/ and run boss's program.
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "ev"
    wrapper.write_text(f"#!/bin/sh\nexec '{node}' '{script}' \"$@\"\n")
    wrapper.chmod(0o755)
    servers = {
        "a": {"command": node, "args": [script, "stdio"]},
        "b": {"command": "./bin/ev", "args": ["stdio"], "env": {"WHO": "b"}},
    }
    kid_model = {"script": [{"text": "k"}]}
    picks = {
        "one": ["b"],
        "unknown": ["b", "zz"],
        "all": None,
    }
    calls = [
        {
            "name": "spawn_pod",
            "arguments": {"name": name, "task": "x", "model": kid_model, "cwd": "sub"}
            | ({} if chosen is None else {"mcp_servers": chosen}),
        }
        for name, chosen in picks.items()
    ]
    await spawn(
        capd,
        "boss",
        scripted({"tool_calls": calls}, {"text": "done"}),
        cwd=str(tmp_path),
        tools=["spawn_pod"],
        mcp_servers=servers,
        # The children (in sub/) run bin/ev, which is outside their cwd and under /tmp: a
        # sandbox's private /tmp would hide it. This test is about the command's path.
        sandbox={"mode": "off"},
    )
    async with await connect_pod(capd, "boss") as boss:
        await boss.request({"method": "run", "text": "go"})
        _, seen = await wait_for(boss, is_event("turn_end"))
    results = dict(zip(picks, [e for e in seen if e["event"] == "tool_result"], strict=True))
    assert results["unknown"]["is_error"] is True
    assert "mcp_servers zz are not among your MCP servers (a, b)" in results["unknown"]["output"]
    assert "MCP servers: b)" in results["one"]["output"]
    assert "MCP servers: a, b)" in results["all"]["output"]
    expected = {"a": {"type": "stdio", "env": {}, **servers["a"]}}
    expected["b"] = {"type": "stdio", **servers["b"], "command": str(wrapper.resolve())}
    assert _stored_manifest(capd, "one")["mcp_servers"] == {"b": expected["b"]}
    assert _stored_manifest(capd, "all")["mcp_servers"] == expected
    assert [s["name"] for s in (await _status(capd, "all"))["mcp"]] == ["a", "b"]
    # The child runs its own server process, in its own cwd.
    servers = {}
    async with asyncio.timeout(30):
        while {s["state"] for pod in ("boss", "one") for s in servers.get(pod, [])} != {"ready"}:
            servers = {pod: (await _status(capd, pod))["mcp"] for pod in ("boss", "one")}
            await asyncio.sleep(0.05)
    (own,) = servers["one"]
    assert (own["name"], own["managed_by"], own["tools"] > 0) == ("b", "capd", True)
    assert own["pid"] not in {s["pid"] for s in servers["boss"]}
    listing = await daemon_request(capd, {"method": "list"})
    assert sorted(p["name"] for p in listing["pods"]) == ["all", "boss", "one"]
