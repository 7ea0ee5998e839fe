"""`restart`: a pod and the descendants that were up come back, parents first, with their
history; one that was stopped stays stopped."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import (
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    run_turn,
    scripted,
    sleeper,
    spawn,
    wait_for,
)

pytestmark = pytest.mark.shared_capd


def _up(pods: list[dict[str, object]]) -> dict[object, bool]:
    """Up or not: a parent may be running a turn, woken by its children's stop reports."""
    return {pod["name"]: pod["status"] != "stopped" for pod in pods}


async def _child(capd: CapdProcess, name: str, parent: Path, cwd: str) -> Path:
    manifest = {"name": name, "model": scripted(), "cwd": cwd}
    spawned = {"method": "spawn", "manifest": manifest, "parent": str(parent)}
    return Path((await daemon_request(capd, spawned))["socket"])


async def test_restart_brings_back_the_descendants_that_were_up(
    capd: CapdProcess, tmp_path: Path
) -> None:
    cwd = str(tmp_path.resolve())
    boss = await spawn(capd, "boss", scripted({"text": "hello"}), cwd=cwd)
    kid = await _child(capd, "kid", boss, cwd)
    await _child(capd, "kid2", boss, cwd)
    await _child(capd, "grandkid", kid, cwd)
    await daemon_request(capd, {"method": "stop", "name": "kid2"})
    async with await connect_pod(capd, "boss") as pod:
        end, _ = await run_turn(pod, "hi")
        assert end["result"] == "finished"
        before = await full_history(pod)

    result = await daemon_request(capd, {"method": "restart", "name": "boss"})

    assert result == {"name": "boss", "socket": str(boss), "cwd": cwd}
    pods = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert _up(pods) == {"boss": True, "kid": True, "kid2": False, "grandkid": True}
    async with await connect_pod(capd, "boss") as pod:
        after = await full_history(pod)
    assert after[: len(before)] == before


async def test_a_descendant_that_cannot_start_is_named_and_the_others_are_up(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """A child whose hidden path became a symlink into its cwd since its spawn cannot be
    started (its sandbox would show it); the restart says so and the rest is up."""
    cwd = tmp_path.resolve()
    (cwd / "work" / "inner").mkdir(parents=True)
    secret = cwd / "secret"
    secret.mkdir()
    boss = await spawn(capd, "boss3", scripted(), cwd=str(cwd))
    hiding = {
        "name": "hider",
        "model": scripted(),
        "cwd": str(cwd / "work"),
        "sandbox": {"hidden": [str(secret)]},
    }
    await daemon_request(capd, {"method": "spawn", "manifest": hiding, "parent": str(boss)})
    await _child(capd, "other", boss, str(cwd))
    secret.rmdir()
    secret.symlink_to(cwd / "work" / "inner")

    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, {"method": "restart", "name": "boss3"})

    pods = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert _up(pods) == {"boss3": True, "hider": False, "other": True}
    assert refused.value.code == "invalid_request"  # the start error's
    assert "pod boss3 restarted, but its descendant hider did not start" in refused.value.message
    assert f"sandbox.hidden {cwd / 'work' / 'inner'} lies inside" in refused.value.message
    assert "capctl start hider" in refused.value.message


async def test_restart_cancels_a_running_turn_and_keeps_the_pod(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn(capd, "busy", sleeper("done"), cwd=str(tmp_path), tools=["bash"])
    async with await connect_pod(capd, "busy") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("tool_call_start"))
        await daemon_request(capd, {"method": "restart", "name": "busy"})
    async with await connect_pod(capd, "busy") as pod:
        ends = [e for e in await full_history(pod) if e["event"] == "turn_end"]
        status = await pod.request({"method": "status"})
    assert [e["result"] for e in ends] == ["cancelled"]
    assert status["status"] == "idle"


async def test_restart_of_an_unknown_pod_is_not_found(capd: CapdProcess) -> None:
    with pytest.raises(ProtocolError) as caught:
        await daemon_request(capd, {"method": "restart", "name": "ghost"})
    assert caught.value.code == "not_found"


async def test_capctl_restart_says_how_many_descendants_came_back(
    capd: CapdProcess, tmp_path: Path
) -> None:
    cwd = str(tmp_path.resolve())
    top = await spawn(capd, "top", scripted(), cwd=cwd)
    for name in ("a", "b"):
        await _child(capd, name, top, cwd)
    command = [sys.executable, "-m", "capctl", "--runtime-dir", str(capd.runtime_dir)]
    done = await asyncio.to_thread(
        subprocess.run, [*command, "restart", "top"], capture_output=True, text=True, timeout=10
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "restarted top (and 2 descendants)\n",
        "",
    )
