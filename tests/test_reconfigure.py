"""`reconfigure` and `capctl update` (§14) through a real capd: a pod takes a new manifest
and keeps its history; what it may not change, and when, is refused."""

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from capctl.render import describe
from protocol.client import Client
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.engine_scaffold import (
    STAND_IN_ACP_AGENT,
    STAND_IN_CLAUDE,
    UNCONFINED,
    engine_starts,
    spawn_on_engine,
)
from tests.fakes.openai_server import OpenAITestServer, TextReply
from tests.helpers import (
    Event,
    alive,
    connect_pod,
    daemon_request,
    full_history,
    group_alive,
    is_event,
    run_turn,
    scripted,
    sleeper,
    spawn,
    until,
    wait_for,
)
from tests.test_capctl import assert_one_line_error, capctl, ok
from tests.test_mcp import LIST_CHANGER, mcp_states, wait_mcp

pytestmark = pytest.mark.shared_capd

ASK_BASH = {"rules": [{"tool": "bash", "action": "ask"}]}


def bash(command: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}


async def reconfigure(pod: Client, manifest: dict[str, Any]) -> list[str]:
    result = await pod.request({"method": "reconfigure", "manifest": manifest})
    return result["changed"]


async def refusal(pod: Client, manifest: dict[str, Any]) -> ProtocolError:
    with pytest.raises(ProtocolError) as refused:
        await pod.request({"method": "reconfigure", "manifest": manifest})
    return refused.value


async def answer(pod: Client, asked: Event, option_id: str) -> None:
    request_id = asked["request_id"]
    await pod.request({"method": "permission", "request_id": request_id, "option_id": option_id})
    await wait_for(pod, is_event("permission_resolved", request_id=request_id))


def reconfigured(history: list[Event]) -> list[list[str]]:
    return [e["changed"] for e in history if e["event"] == "reconfigured"]


async def test_the_next_turn_uses_the_new_model_prompt_and_tools_with_the_history_kept(
    capd: CapdProcess, tmp_path: Path
) -> None:
    async with OpenAITestServer() as server:
        server.enqueue(TextReply("one"), TextReply("two"), TextReply("three"))
        model_a = {"provider": "openai", "name": "model-a", "base_url": server.base_url}
        model_b = {**model_a, "name": "model-b"}
        first = {"name": "r1", "model": model_a, "system_prompt": "A", "cwd": str(tmp_path)}
        await spawn(capd, "r1", model_a, system_prompt="A", cwd=str(tmp_path))
        async with await connect_pod(capd, "r1") as pod:
            await run_turn(pod, "first")
            before = await pod.request({"method": "status"})
            second = {**first, "model": model_b, "system_prompt": "B", "tools": ["read_file"]}
            changed = await reconfigure(pod, second)
            event, _ = await wait_for(pod, is_event("reconfigured"))
            status = await pod.request({"method": "status"})
            end, _ = await run_turn(pod, "second")
            assert await reconfigure(pod, {**second, "tools": []}) == ["tools"]
            await run_turn(pod, "third")
            history = await full_history(pod)
        requests = list(server.requests)
    assert changed == ["model", "system_prompt", "tools"]
    assert event["changed"] == changed
    assert (before["model"], before["tools"]) == ("openai/model-a", [])
    assert (status["model"], status["tools"]) == ("openai/model-b", ["read_file"])
    assert end["output"] == "two"
    assert [r["model"] for r in requests] == ["model-a", "model-b", "model-b"]
    assert requests[1]["messages"] == [
        {"role": "system", "content": "B"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "second"},
    ]
    assert ["tools" in r for r in requests] == [False, True, False]
    assert [t["function"]["name"] for t in requests[1]["tools"]] == ["read_file"]
    assert reconfigured(history) == [changed, ["tools"]]


async def test_the_same_manifest_changes_nothing_and_records_nothing(
    capd: CapdProcess, tmp_path: Path
) -> None:
    model = scripted({"text": "hi"})
    no_checkpoints = {"checkpoints": False}
    await spawn(capd, "r2", model, cwd=str(tmp_path), tools=["bash"], workspace=no_checkpoints)
    async with await connect_pod(capd, "r2") as pod:
        before = await pod.request({"method": "status"})
        # No cwd, or no workspace, keeps the pod's; a cwd spelled another way is the same.
        assert await reconfigure(pod, {"name": "r2", "model": model, "tools": ["bash"]}) == []
        same = {
            "name": "r2",
            "model": model,
            "tools": ["bash"],
            "cwd": f"{tmp_path}/./",
            "workspace": no_checkpoints,
        }
        assert await reconfigure(pod, same) == []
        after = await pod.request({"method": "status"})
    assert after["last_seq"] == before["last_seq"]


async def test_what_a_pod_keeps_and_a_running_turn_are_refused(
    capd: CapdProcess, tmp_path: Path
) -> None:
    model = sleeper("done")
    base = {"name": "r3", "model": model, "cwd": str(tmp_path), "tools": ["bash"]}
    await spawn(capd, "r3", model, cwd=str(tmp_path), tools=["bash"])
    (tmp_path / "elsewhere").mkdir()
    async with await connect_pod(capd, "r3") as pod:
        renamed = await refusal(pod, {**base, "name": "r4"})
        moved = await refusal(pod, {**base, "cwd": str(tmp_path / "elsewhere")})
        acp = {"name": "r3", "engine": {"kind": "acp", "command": ["agent"]}}
        other_engine = await refusal(pod, acp)
        workspace = await refusal(pod, {**base, "workspace": {"checkpoints": False}})
        started = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("tool_call_start"))
        running = await refusal(pod, {**base, "system_prompt": "new"})
        await pod.request({"method": "cancel"})
        history = await full_history(pod)
    for error, field in ((renamed, "name"), (moved, "cwd"), (workspace, "workspace")):
        assert error.code == "invalid_request"
        assert f"cannot reconfigure pod r3: {field} " in error.message
    assert other_engine.code == "invalid_request"
    assert "engine kind acp is not its builtin" in other_engine.message
    assert running.code == "already_running"
    assert started["turn_id"] in running.message
    assert "capctl pause r3" in running.message
    assert reconfigured(history) == []


async def test_mcp_servers_are_kept_unless_what_they_depend_on_changes(
    capd: CapdProcess, tmp_path: Path
) -> None:
    changer = {"command": sys.executable, "args": [str(LIST_CHANGER)]}
    model = scripted({"text": "hi"})
    base = {"name": "r9", "model": model, "cwd": str(tmp_path), "mcp_servers": {"a": changer}}
    await spawn(capd, "r9", model, cwd=str(tmp_path), mcp_servers={"a": changer})
    async with await connect_pod(capd, "r9", subscribe=False) as pod:
        ready = await wait_mcp(pod, "a", lambda state: state["state"] == "ready")
        assert await reconfigure(pod, {**base, "system_prompt": "B"}) == ["system_prompt"]
        kept = await mcp_states(pod)
        renamed = {**base, "system_prompt": "B", "mcp_servers": {"b": changer}}
        assert await reconfigure(pod, renamed) == ["mcp_servers"]
        started = await wait_mcp(pod, "b", lambda state: state["state"] == "ready")
        await until(lambda: not alive(ready["pid"]))
        names = list(await mcp_states(pod))
        # New resource limits stop the pod's processes before they apply.
        limited = {**renamed, "limits": {"memory_mb": 256}}
        assert await reconfigure(pod, limited) == ["limits"]
        assert not alive(started["pid"])
        again = await wait_mcp(pod, "b", lambda state: state["state"] == "ready")
    assert kept["a"]["pid"] == ready["pid"]
    assert started["pid"] != ready["pid"]
    assert names == ["b"]
    assert again["pid"] != started["pid"]


async def test_a_paused_turn_resumes_under_the_new_model(capd: CapdProcess, tmp_path: Path) -> None:
    model_a = scripted(bash("sleep 30"), {"text": "from A"})
    model_b = scripted({"text": "unused"}, {"text": "from B"}) | {"name": "b"}
    base = {"name": "r5", "cwd": str(tmp_path), "tools": ["bash"]}
    await spawn(capd, "r5", model_a, cwd=str(tmp_path), tools=["bash"])
    async with await connect_pod(capd, "r5") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("tool_call_start"))
        await pod.request({"method": "pause"})
        await wait_for(pod, is_event("status", status="paused"))
        assert await reconfigure(pod, {**base, "model": model_b}) == ["model"]
        status = await pod.request({"method": "status"})
        await pod.request({"method": "resume"})
        end, _ = await wait_for(pod, is_event("turn_end"))
    assert (status["status"], status["model"]) == ("paused", "scripted/b")
    assert (end["result"], end["output"]) == ("finished", "from B")


async def test_a_parent_cannot_be_narrowed_below_a_child_that_is_up(
    capd: CapdProcess, tmp_path: Path
) -> None:
    model = scripted({"text": "hi"})
    tools = ["bash", "read_file"]
    parent = {"name": "p1", "model": model, "cwd": str(tmp_path), "tools": tools}
    socket = await spawn(capd, "p1", model, cwd=str(tmp_path), tools=tools)
    child = {"name": "c1", "model": model, "cwd": str(tmp_path), "tools": ["read_file"]}
    await daemon_request(capd, {"method": "spawn", "manifest": child, "parent": str(socket)})
    async with await connect_pod(capd, "p1", subscribe=False) as pod:
        narrowed = await refusal(pod, {**parent, "tools": ["bash"]})
        assert await reconfigure(pod, {**parent, "tools": ["read_file"]}) == ["tools"]
    async with await connect_pod(capd, "c1", subscribe=False) as pod:
        widened = await refusal(pod, {**child, "tools": tools})
    assert narrowed.code == "forbidden"
    assert "pod p1 would be narrower than its child pod c1: " in narrowed.message
    assert "tools read_file are not among parent pod p1's tools (bash)" in narrowed.message
    assert widened.code == "forbidden"
    assert "tools bash are not among parent pod p1's tools (read_file)" in widened.message


async def test_a_parent_cannot_be_narrowed_below_a_stopped_child(
    capd: CapdProcess, tmp_path: Path
) -> None:
    model = scripted({"text": "hi"})
    tools = ["bash", "read_file"]
    parent = {"name": "p2", "model": model, "cwd": str(tmp_path), "tools": tools}
    socket = await spawn(capd, "p2", model, cwd=str(tmp_path), tools=tools)
    child = {"name": "c2", "model": model, "cwd": str(tmp_path), "tools": ["bash"]}
    await daemon_request(capd, {"method": "spawn", "manifest": child, "parent": str(socket)})
    async with await connect_pod(capd, "p2") as pod:
        await daemon_request(capd, {"method": "stop", "name": "c2"})
        await wait_for(pod, is_event("turn_end"))  # the child's shut_down report
        narrowed = await refusal(pod, {**parent, "tools": ["read_file"]})
    started = await daemon_request(capd, {"method": "start", "name": "c2"})
    async with await connect_pod(capd, "c2", subscribe=False) as pod:
        status = await pod.request({"method": "status"})
    assert narrowed.code == "forbidden"
    assert "pod p2 would be narrower than its child pod c2: tools bash" in narrowed.message
    assert "`capctl update c2`" in narrowed.message
    assert started["name"] == "c2"
    assert status["tools"] == ["bash"]


async def test_a_child_spawned_while_new_limits_apply_refuses_them_and_the_old_ones_stay(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """New limits stop the pod's processes first; a wider child spawned meanwhile is seen
    just before the commit, and the pod goes on with its old manifest and limits."""
    stopping = tmp_path / "stopping"
    # An MCP server that takes a second to exit once told to (its stdin closed), saying
    # so; unconfined, as a sandbox goes at once with its processes.
    script = f'trap "" TERM; {sys.executable} {LIST_CHANGER}; touch {stopping}; sleep 1'
    model = scripted({"text": "hi"})
    tools = ["bash", "read_file"]
    parent = {
        "name": "p4",
        "model": model,
        "cwd": str(tmp_path),
        "tools": tools,
        "mcp_servers": {"a": {"command": "bash", "args": ["-c", script]}},
        "sandbox": UNCONFINED,
    }
    socket = (await daemon_request(capd, {"method": "spawn", "manifest": parent}))["socket"]
    child = {"name": "c4", "model": model, "cwd": str(tmp_path), "tools": ["bash"]}
    child["sandbox"] = UNCONFINED
    narrowed = {**parent, "tools": ["read_file"], "limits": {"memory_mb": 256}}
    async with await connect_pod(capd, "p4", subscribe=False) as pod:
        first = await wait_mcp(pod, "a", lambda state: state["state"] == "ready")
        request = {"method": "reconfigure", "manifest": narrowed}
        reconfiguring = asyncio.ensure_future(pod.request(request))
        await until(stopping.exists)
        await daemon_request(capd, {"method": "spawn", "manifest": child, "parent": socket})
        with pytest.raises(ProtocolError) as refused:
            await reconfiguring
        status = await pod.request({"method": "status"})
        again = await wait_mcp(pod, "a", lambda state: state["state"] == "ready")
        history = await full_history(pod)
    assert refused.value.code == "forbidden"
    assert "pod p4 would be narrower than its child pod c4: tools bash" in refused.value.message
    assert (status["tools"], status["sandbox"]["limits"]) == (tools, "none")
    assert again["pid"] != first["pid"]
    assert "256" not in Path(f"/proc/{again['pid']}/limits").read_text()
    assert "p4" not in Path(f"/proc/{again['pid']}/cgroup").read_text()
    assert reconfigured(history) == []


@pytest.mark.own_capd
async def test_a_child_wider_than_its_parent_now_does_not_come_up(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """A parent narrowed below a child (by a capd that did not check stopped children):
    the child stays down at restore, listed with why, and start and restart refuse it;
    a restart says which of its descendants it took down stay stopped."""
    model = scripted({"text": "hi"})
    tools = ["bash", "read_file"]
    socket = await spawn(capd, "p3", model, cwd=str(tmp_path), tools=tools)
    child = {"name": "c3", "model": model, "cwd": str(tmp_path), "tools": tools}
    result = await daemon_request(
        capd, {"method": "spawn", "manifest": child, "parent": str(socket)}
    )
    grandchild = {"name": "g3", "model": model, "cwd": str(tmp_path), "tools": ["read_file"]}
    await daemon_request(
        capd, {"method": "spawn", "manifest": grandchild, "parent": result["socket"]}
    )
    capd.stop()
    with sqlite3.connect(capd.state_dir / "capd.db") as db:
        (stored,) = db.execute("SELECT manifest FROM pods WHERE name = 'p3'").fetchone()
        narrowed = json.loads(stored) | {"tools": ["read_file"]}
        db.execute("UPDATE pods SET manifest = ? WHERE name = 'p3'", (json.dumps(narrowed),))
    await asyncio.to_thread(capd.start)
    listed = await daemon_request(capd, {"method": "list"})
    restored = {pod["name"]: (pod["status"], pod["error"]) for pod in listed["pods"]}
    refusals = []
    for method in ("start", "restart"):
        with pytest.raises(ProtocolError) as refused:
            await daemon_request(capd, {"method": method, "name": "c3"})
        refusals.append(refused.value)
    listed = await daemon_request(capd, {"method": "list"})
    after = {pod["name"]: pod["status"] for pod in listed["pods"]}
    assert (restored["p3"], restored["g3"]) == (("idle", None), ("idle", None))
    status, error = restored["c3"]
    assert status == "stopped"
    assert error is not None
    assert "cannot start, as it is wider than its parent pod p3 now: tools bash" in error
    for refused in refusals:
        assert refused.code == "forbidden"
        assert "pod c3 cannot start, as it is wider than its parent pod p3" in refused.message
        assert "`capctl update p3`" in refused.message
    assert "so its descendants g3 stay stopped" in refusals[1].message
    assert after == {"p3": "idle", "c3": "stopped", "g3": "stopped"}


async def test_an_external_engines_process_stops_and_its_session_resumes_with_new_options(
    capd: CapdProcess, tmp_path: Path
) -> None:
    engine = STAND_IN_CLAUDE.engine(tmp_path)
    (tmp_path / "slow-interrupt").touch()  # the paused prompt winds down after a while
    manifest = {"name": "r8", "engine": engine, "cwd": str(tmp_path), "sandbox": UNCONFINED}
    await spawn_on_engine(capd, "r8", engine, cwd=str(tmp_path), sandbox=UNCONFINED)
    async with await connect_pod(capd, "r8") as pod:
        await pod.request({"method": "run", "text": "slow:200"})
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "pause"})
        await wait_for(pod, is_event("status", status="paused"))
        new = {**manifest, "engine": {**engine, "model": "opus"}}
        assert await reconfigure(pod, new) == ["engine"]
        paused_costs = [
            (e.get("usage") or {}).get("cost_usd")
            for e in await full_history(pod)
            if e["event"] == "assistant_message"
        ]
        status = await pod.request({"method": "status"})
        (first,) = engine_starts(tmp_path)
        stopped = not group_alive(first["pgid"])
        await pod.request({"method": "resume"})
        end, _ = await wait_for(pod, is_event("turn_end"))
        history = await full_history(pod)
    assert (status["status"], status["model"]) == ("paused", "claude-code/opus")
    # The paused prompt's cost came in as its old process wound down, before it stopped.
    assert any(cost and cost > 0 for cost in paused_costs), paused_costs
    assert stopped
    _, second = engine_starts(tmp_path)
    [session] = [e["session_id"] for e in history if e["event"] == "engine_session"]
    assert second["argv"][second["argv"].index("--resume") + 1] == session
    assert second["argv"][second["argv"].index("--model") + 1] == "opus"
    assert end["result"] == "finished"


STRICTER = {"rules": [*ASK_BASH["rules"], {"tool": "read_file", "action": "deny"}]}
"""ASK_BASH and one rule more: the rule indexes the grants name are other rules now."""


async def spawn_granted(capd: CapdProcess, name: str, cwd: Path) -> dict[str, Any]:
    """Spawn `name` asking before bash, and run a turn whose question is answered
    `allow_always`; returns its manifest, but for `permissions`. Its next turn runs bash
    again and answers "two"."""
    model = scripted(bash("true"), {"text": "one"}, bash("true"), {"text": "two"})
    await spawn(capd, name, model, cwd=str(cwd), tools=["bash"], permissions=ASK_BASH)
    async with await connect_pod(capd, name) as pod:
        await pod.request({"method": "run", "text": "go"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
        await answer(pod, asked, "allow_always")
        await wait_for(pod, is_event("turn_end"))
    return {"name": name, "model": model, "cwd": str(cwd), "tools": ["bash"]}


@pytest.mark.own_capd
async def test_new_permissions_drop_the_grants_and_a_restart_keeps_the_new_manifest(
    capd: CapdProcess, tmp_path: Path
) -> None:
    asking = await spawn_granted(capd, "r6", tmp_path)
    async with await connect_pod(capd, "r6") as pod:
        new = {**asking, "permissions": STRICTER, "system_prompt": "B"}
        assert await reconfigure(pod, new) == ["system_prompt", "permissions"]

    capd.stop()
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "r6") as pod:
        await pod.request({"method": "run", "text": "again"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
        await answer(pod, asked, "allow_once")
        end, _ = await wait_for(pod, is_event("turn_end"))
        assert await reconfigure(pod, new) == []  # the manifest restored is the new one
    assert end["output"] == "two"


async def test_new_permissions_drop_the_grants_of_a_pod_that_stays_up(
    capd: CapdProcess, tmp_path: Path
) -> None:
    asking = await spawn_granted(capd, "r10", tmp_path)
    async with await connect_pod(capd, "r10") as pod:
        assert await reconfigure(pod, {**asking, "permissions": STRICTER}) == ["permissions"]
        await pod.request({"method": "run", "text": "again"})
        # The grant would let bash run unasked, and the turn end.
        asked_again, _ = await wait_for(
            pod, lambda e: e["event"] in ("permission_request", "turn_end")
        )
        assert asked_again["event"] == "permission_request"
        await answer(pod, asked_again, "allow_once")
        end, _ = await wait_for(pod, is_event("turn_end"))
    assert end["output"] == "two"


async def test_capctl_update_says_what_changed(capd: CapdProcess, tmp_path: Path) -> None:
    await spawn(capd, "r7", {"provider": "scripted"}, cwd=str(tmp_path))
    manifest = tmp_path / "pod.yaml"
    manifest.write_text("model: {provider: scripted}\nsystem_prompt: be brief\ncwd: .\n")
    runtime = capd.runtime_dir
    assert ok(runtime, "update", "r7", "-f", str(manifest)) == "updated r7: system_prompt changed\n"
    assert ok(runtime, "update", "r7", "-f", str(manifest)) == "r7: nothing changed\n"
    manifest.write_text("model: {provider: scripted}\ncwd: /\n")
    assert_one_line_error(capctl(runtime, "update", "r7", "-f", str(manifest)), "cwd / is not")


def test_log_shows_what_a_reconfigure_changed() -> None:
    event = {"event": "reconfigured", "changed": ["model", "tools"]}
    assert describe(event) == "── reconfigured: model, tools changed"


async def test_an_acp_pods_new_engine_counts_the_loaded_sessions_cost_from_where_it_was(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """The agent reports its session's cumulative cost; the engine a reconfigure brings up
    loads that session, and its next prompt's cost counts in full."""
    (tmp_path / "report-cost").touch()
    engine = STAND_IN_ACP_AGENT.engine(tmp_path)
    manifest = {"name": "r11", "engine": engine, "cwd": str(tmp_path), "sandbox": UNCONFINED}
    await spawn_on_engine(capd, "r11", engine, cwd=str(tmp_path), sandbox=UNCONFINED)
    async with await connect_pod(capd, "r11") as pod:
        await run_turn(pod, "one")
        once = (await pod.request({"method": "status"}))["spent"]["usd"]
        assert await reconfigure(pod, {**manifest, "system_prompt": "B"}) == ["system_prompt"]
        await run_turn(pod, "two")
        twice = (await pod.request({"method": "status"}))["spent"]["usd"]
    assert once > 0
    assert twice == pytest.approx(2 * once)
