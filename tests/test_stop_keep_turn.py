"""`stop {keep_turn: true}` (§16): the pod's and its descendants' turns are paused, not
cancelled, and come back `paused` at `start`; `resume` finishes them. Plain `stop` still
cancels. The turns are held in a `sleep 30` tool call."""

from pathlib import Path

import pytest

from tests.conftest import CapdProcess
from tests.helpers import (
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    resume_turn,
    sleeper,
    spawn,
    wait_for,
)
from tests.test_capctl import ok

pytestmark = pytest.mark.shared_capd


async def _running_in_tool(capd: CapdProcess, name: str) -> str:
    """Start a turn of the sleeper pod; once its `sleep 30` call is committed, its turn id."""
    async with await connect_pod(capd, name) as pod:
        started = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("assistant_message"))
    return started["turn_id"]


async def _status(capd: CapdProcess, name: str) -> str:
    async with await connect_pod(capd, name, subscribe=False) as pod:
        return (await pod.request({"method": "status"}))["status"]


async def test_stop_keep_turn_pauses_the_pod_and_its_child(
    capd: CapdProcess, tmp_path: Path
) -> None:
    parent = await spawn(capd, "kp", sleeper("parent done"), cwd=str(tmp_path), tools=["bash"])
    await daemon_request(
        capd,
        {
            "method": "spawn",
            "manifest": {"name": "kc", "model": sleeper("child done"), "tools": ["bash"]}
            | {"cwd": str(tmp_path)},
            "parent": str(parent),
        },
    )
    turns = {name: await _running_in_tool(capd, name) for name in ("kp", "kc")}
    ok(capd.runtime_dir, "stop", "kp", "--keep-turn")
    for name in ("kp", "kc"):
        await daemon_request(capd, {"method": "start", "name": name})
        assert await _status(capd, name) == "paused"
    for name, text in (("kc", "child done"), ("kp", "parent done")):
        async with await connect_pod(capd, name) as pod:
            end, _ = await resume_turn(pod)
            assert (end["turn_id"], end["result"], end["output"]) == (turns[name], "finished", text)
            history = await full_history(pod)
        assert [e["result"] for e in history if e["event"] == "turn_end"] == ["finished"]


async def test_plain_stop_cancels_the_turn(capd: CapdProcess, tmp_path: Path) -> None:
    await spawn(capd, "ks", sleeper("never"), cwd=str(tmp_path), tools=["bash"])
    turn = await _running_in_tool(capd, "ks")
    ok(capd.runtime_dir, "stop", "ks")
    await daemon_request(capd, {"method": "start", "name": "ks"})
    assert await _status(capd, "ks") == "idle"
    async with await connect_pod(capd, "ks", subscribe=False) as pod:
        history = await full_history(pod)
    ends = [(e["turn_id"], e["result"]) for e in history if e["event"] == "turn_end"]
    assert ends == [(turn, "cancelled")]
