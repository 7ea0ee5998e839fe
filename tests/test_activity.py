"""The daemon's view of many pods: `overview` and `subscribe {activity}` (docs/protocol.md,
pod_activity), through a real capd, on the builtin engine and the stand-in external ones."""

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from protocol.client import Client
from protocol.events import PodActivity
from tests.conftest import CapdProcess
from tests.engine_scaffold import STAND_IN_ACP_AGENT, STAND_IN_CLAUDE, spawn_on_engine
from tests.helpers import daemon_request, scripted, spawn, wait_for

pytestmark = pytest.mark.shared_capd

Event = dict[str, Any]


def bash(command: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}


async def activity_feed(capd: CapdProcess) -> Client:
    daemon = await Client.connect(capd.socket)
    await daemon.request({"method": "subscribe", "activity": True})
    return daemon


def activity_of(pod: str, **fields: Any) -> Any:
    return lambda e: (
        e.get("event") == "pod_activity"
        and e.get("pod") == pod
        and all(e.get(k) == v for k, v in fields.items())
    )


async def run(capd: CapdProcess, pod: str, text: str) -> None:
    async with await Client.connect(capd.pod_socket(pod)) as client:
        await client.request({"method": "run", "text": text})


async def test_overview_lists_every_pod_with_its_activity(
    capd: CapdProcess, tmp_path: Path
) -> None:
    parent = await spawn(capd, "p1", scripted({"text": "hi"}), cwd=str(tmp_path))
    await daemon_request(
        capd,
        {
            "method": "spawn",
            "parent": str(parent),
            "manifest": {"name": "c1", "model": scripted(), "tools": [], "cwd": str(tmp_path)},
        },
    )
    await spawn(capd, "gone", scripted())
    await daemon_request(capd, {"method": "stop", "name": "gone"})
    before = time.time()
    async with await Client.connect(capd.pod_socket("p1")) as p1:
        await p1.request({"method": "subscribe"})
        await p1.request({"method": "run", "text": "hello"})
        await wait_for(p1, lambda e: e.get("event") == "status" and e["status"] == "idle")

    pods = (await daemon_request(capd, {"method": "overview"}))["pods"]

    assert [p["pod"] for p in pods] == ["p1", "c1", "gone"]
    by_name = {p["pod"]: PodActivity.model_validate(p) for p in pods}
    p1, c1, gone = by_name["p1"], by_name["c1"], by_name["gone"]
    assert p1.status == "idle"
    assert p1.since >= before
    assert p1.last_result == "finished"
    assert p1.turn_id is None
    assert p1.phase is None
    assert p1.model == "scripted"
    assert p1.socket == str(parent)
    assert p1.usage.input_tokens > 0
    assert p1.context_tokens > 0
    assert p1.spent.tokens == p1.usage.input_tokens + p1.usage.output_tokens
    assert c1.parent == str(parent)
    assert c1.status == "idle"
    assert c1.last_result is None
    assert gone.status == "stopped"
    assert gone.since > 0
    assert gone.error is None
    assert gone.socket == str(capd.pod_socket("gone"))


async def test_a_turn_with_a_slow_tool_shows_its_phases(capd: CapdProcess) -> None:
    feed = await activity_feed(capd)
    await spawn(capd, "w1", scripted(bash("sleep 1.5"), {"text": "done"}), tools=["bash"])
    spawned, _ = await wait_for(feed, lambda e: e.get("event") == "pod_spawned")
    assert spawned["pod"] == "w1"
    await wait_for(feed, activity_of("w1", status="idle"))

    await run(capd, "w1", "go")

    tool, seen = await wait_for(feed, activity_of("w1", phase="tool"))
    assert tool["tool"] == "bash"
    assert tool["status"] == "running"
    assert tool["step"] == 1
    assert tool["turn_id"].startswith("t-")
    assert tool["phase_since"] >= tool["since"]
    assert any(e.get("event") == "pod_status" and e["status"] == "running" for e in seen)
    end, _ = await wait_for(feed, activity_of("w1", status="idle"))
    assert end["last_result"] == "finished"
    assert end["phase"] is None
    assert end["tool"] is None
    assert end["step"] == 0
    assert end["turn_id"] is None
    await feed.close()


async def test_a_model_call_waiting_to_be_retried_shows_retry(capd: CapdProcess) -> None:
    model = {**scripted({"error": "overloaded", "retryable": True}), "max_retries": 1}
    await spawn(capd, "r1", model)
    feed = await activity_feed(capd)
    await run(capd, "r1", "go")
    retry, _ = await wait_for(feed, activity_of("r1", phase="retry"))
    assert retry["status"] == "running"
    end, _ = await wait_for(feed, activity_of("r1", status="idle"))
    assert end["last_result"] == "errored"
    await feed.close()


async def test_pod_activity_is_coalesced_per_pod(capd: CapdProcess) -> None:
    """A turn of 12 quick tool steps emits dozens of events; a subscriber gets one
    pod_activity per pod per 250 ms at most (counted against the turn's length on capd's
    clock, so a slow test process cannot blur it), the last one current."""
    steps = [bash("true") for _ in range(12)]
    await spawn(capd, "busy", scripted(*steps, {"text": "done"}), tools=["bash"])
    feed = await activity_feed(capd)
    async with await Client.connect(capd.pod_socket("busy")) as pod:
        await pod.request({"method": "subscribe"})
        await pod.request({"method": "run", "text": "go"})
        end, events = await wait_for(pod, lambda e: e.get("event") == "turn_end")
    last, seen = await wait_for(feed, activity_of("busy", status="idle"))
    assert last["last_result"] == "finished"
    sent = [e for e in seen if e["event"] == "pod_activity"]
    durable = [e for e in events if "seq" in e]
    length = end["ts"] - durable[0]["ts"]
    # one at the first change, one per 250 ms of the turn, one after its end
    assert len(sent) <= length / 0.25 + 2, (len(sent), length)
    assert len(durable) > 3 * len(sent)
    await feed.close()


async def test_a_plain_daemon_subscriber_gets_no_activity(capd: CapdProcess) -> None:
    plain = await Client.connect(capd.socket)
    await plain.request({"method": "subscribe"})
    feed = await activity_feed(capd)
    await spawn(capd, "q1", scripted({"text": "hi"}))
    await run(capd, "q1", "hello")
    await wait_for(feed, activity_of("q1", last_result="finished"))
    await plain.request({"method": "info"})  # its reply comes after every event queued before
    seen = []
    while True:
        try:
            seen.append((await plain.next_event(0))["event"])
        except TimeoutError:
            break
    assert seen == ["pod_spawned", "pod_status", "pod_status"]
    await plain.close()
    await feed.close()


async def test_claude_code_shows_its_running_tool(capd: CapdProcess, tmp_path: Path) -> None:
    state = tmp_path / "engine"
    state.mkdir()
    feed = await activity_feed(capd)
    await spawn_on_engine(capd, "x1", STAND_IN_CLAUDE.engine(state))
    await run(capd, "x1", "tool:sleep 1.5")
    tool, _ = await wait_for(feed, activity_of("x1", phase="tool"), timeout=20)
    assert tool["tool"] == "Bash"
    assert tool["status"] == "running"
    end, _ = await wait_for(feed, activity_of("x1", status="idle"), timeout=20)
    assert end["last_result"] == "finished"
    assert end["phase"] is None
    await feed.close()


async def test_acp_shows_its_question_then_its_running_tool(
    capd: CapdProcess, tmp_path: Path
) -> None:
    state = tmp_path / "engine"
    state.mkdir()
    feed = await activity_feed(capd)
    await spawn_on_engine(capd, "x2", STAND_IN_ACP_AGENT.engine(state, permission="ask"))
    await run(capd, "x2", "tool:sleep 1.5")
    asked, _ = await wait_for(feed, activity_of("x2", phase="permission"), timeout=20)
    assert asked["permissions"] == 1
    async with await Client.connect(capd.pod_socket("x2")) as pod:
        question = (await pod.request({"method": "status"}))["permissions"][0]
        await pod.request(
            {"method": "permission", "request_id": question["request_id"], "option_id": "allow"}
        )
    tool, _ = await wait_for(feed, activity_of("x2", phase="tool"), timeout=20)
    assert tool["tool"]
    assert tool["permissions"] == 0
    end, _ = await wait_for(feed, activity_of("x2", status="idle"), timeout=20)
    assert end["last_result"] == "finished"
    await feed.close()


@pytest.mark.own_capd
async def test_pods_down_after_a_restart_are_listed_stopped(capd: CapdProcess) -> None:
    """One stopped before capd started (since unknown, its usage from the store) and one
    whose stored state is damaged (with the reason)."""
    for name in ("parked", "bad"):
        await spawn(capd, name, scripted())
        async with await Client.connect(capd.pod_socket(name)) as pod:
            await pod.request({"method": "subscribe"})
            await pod.request({"method": "run", "text": "hello there"})
            await wait_for(pod, lambda e: e.get("event") == "turn_end")
    await daemon_request(capd, {"method": "stop", "name": "parked"})
    capd.stop()
    with sqlite3.connect(capd.state_dir / "capd.db") as db:
        db.execute("UPDATE events SET data = '{\"event\": \"turn_st' WHERE pod = 'bad' AND seq = 2")
    db.close()
    await asyncio.to_thread(capd.start)

    pods = {p["pod"]: p for p in (await daemon_request(capd, {"method": "overview"}))["pods"]}

    parked, bad = pods["parked"], pods["bad"]
    assert (parked["status"], parked["since"], parked["error"]) == ("stopped", 0, None)
    assert parked["usage"]["input_tokens"] > 0
    assert parked["spent"]["tokens"] == sum(
        parked["usage"][k] for k in ("input_tokens", "output_tokens")
    )
    assert bad["status"] == "stopped"
    assert bad["error"].startswith("cannot be restored")
