"""Longer runs with real MCP servers, skipped unless CAPD_REAL_MCP=1: `mcp-server-git`
reviewing and committing in a pod's repository, a server killed again and again, and
servers of busy pods killed at random. The servers are the ones tests/mcp_servers.py
installs for the default suite."""

import asyncio
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from protocol.client import Client
from tests.conftest import CapdProcess
from tests.helpers import (
    Event,
    connect_pod,
    full_history,
    is_event,
    run_turn,
    scripted,
    spawn,
    wait_for,
)
from tests.mcp_servers import McpServerCommands
from tests.test_mcp import (
    EXECUTING,
    call,
    everything,
    logged,
    long_call,
    mcp_states,
    ready,
    restarted,
    results,
    server_under,
    tap_sandbox,
    tapped,
    wait_mcp,
)

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("CAPD_REAL_MCP") != "1",
        reason="longer MCP runs: export CAPD_REAL_MCP=1 to run these",
    ),
    pytest.mark.shared_capd,
]

AUTHOR = {
    "GIT_AUTHOR_NAME": "capd test",
    "GIT_AUTHOR_EMAIL": "capd-test@example.invalid",
    "GIT_COMMITTER_NAME": "capd test",
    "GIT_COMMITTER_EMAIL": "capd-test@example.invalid",
}
KILLS = 4
"""Kills in a row: the backoff doubles from 1 s, so the last restart waits about 8 s."""
PODS = 3
LOOP_STEPS = 800
"""Steps of each busy pod's turn, each an MCP call and a `bash true` (about 25 ms even
while the server is down): longer than the kills take, and few enough for one spawn
request's script."""
KILLS_PER_POD = 2
"""So that no pod's backoff grows past 2 s."""


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args],
        env={**os.environ, **AUTHOR},
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


async def _wait_idle(pod: Client, timeout: float = 120.0) -> None:
    async with asyncio.timeout(timeout):
        while (await pod.request({"method": "status"}))["status"] != "idle":
            await asyncio.sleep(0.2)


async def _last_turn_end(pod: Client) -> Event:
    return [e for e in await full_history(pod) if e["event"] == "turn_end"][-1]


async def test_git_server_reviews_and_commits_in_the_pods_repository(
    capd: CapdProcess, mcp_commands: McpServerCommands, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "notes.txt").write_text("one\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "first")
    (repo / "notes.txt").write_text("two\n")
    steps = [
        call("mcp__git__git_status", repo_path="."),
        call("mcp__git__git_diff_unstaged", repo_path="."),
        call("mcp__git__git_add", repo_path=".", files=["notes.txt"]),
        call("mcp__git__git_commit", repo_path=".", message="second, by the model"),
        call("mcp__git__git_log", repo_path=".", max_count=5),
        {"text": "committed"},
    ]
    # `--repository .` and `repo_path: .` mean the pod's cwd: the server runs there.
    git = {"command": mcp_commands.git[0], "args": ["--repository", "."], "env": AUTHOR}
    await spawn(capd, "g1", scripted(*steps), cwd=str(repo), mcp_servers={"git": git})
    async with await connect_pod(capd, "g1") as pod:
        state = await wait_mcp(pod, "git", ready)
        end, seen = await run_turn(pod, "commit my change")
    assert state["tools"] == 12
    status, diff, added, committed, log = results(seen)
    assert not any(r["is_error"] for r in (status, diff, added, committed, log)), seen
    assert "modified:   notes.txt" in status["output"]
    assert "-one\n+two" in diff["output"]
    assert "Changes committed successfully" in committed["output"]
    assert "Message: second, by the model" in log["output"]
    assert end["output"] == "committed"
    assert _git(repo, "log", "-1", "--format=%an %s") == "capd test second, by the model\n"


async def test_a_server_killed_again_and_again_comes_back_each_time(
    capd: CapdProcess, mcp_commands: McpServerCommands, tmp_path: Path
) -> None:
    """Kills alternate between mid-call and idle; each restart comes after a longer
    backoff, and the tools work at the end."""
    steps = [long_call(), {"text": "lost"}] * KILLS
    steps += [call("mcp__everything__echo", message="survived"), {"text": "done"}]
    log = tmp_path / "tap.log"
    await spawn(
        capd,
        "x1",
        scripted(*steps),
        mcp_servers={"everything": tapped(mcp_commands, log)},
        sandbox=tap_sandbox(log),
    )
    async with await connect_pod(capd, "x1") as pod:
        state = await wait_mcp(pod, "everything", ready)
        first = state
        for kill in range(KILLS):
            pid = state["pid"]
            if kill % 2 == 0:
                await pod.request({"method": "run", "text": "call"})
                await logged(log, EXECUTING, times=kill // 2 + 1)
                os.kill(server_under(pid), signal.SIGKILL)  # the tap exits with it
                lost, _ = await wait_for(pod, is_event("tool_result"))
                await wait_for(pod, is_event("turn_end"))
                assert lost["is_error"] is True
                assert "MCP server everything is unavailable" in lost["output"]
            else:
                os.kill(server_under(pid), signal.SIGKILL)
                end, seen = await run_turn(pod, "call")
                assert [r["is_error"] for r in results(seen)] == [True]
            state = await wait_mcp(pod, "everything", restarted(pid))
        end, seen = await run_turn(pod, "echo")
        last = (await mcp_states(pod))["everything"]
    assert last["restarts"] == first["restarts"] + KILLS
    assert [r["output"] for r in results(seen)] == ["Echo: survived"]
    assert end["output"] == "done"


async def test_servers_of_busy_pods_killed_at_random_all_come_back(
    capd: CapdProcess, mcp_commands: McpServerCommands
) -> None:
    """Pods call their servers in a loop while servers are SIGKILLed at random moments
    (the seed is printed); every turn ends, every server is ready again with one restart
    per kill, and no killed server is left."""
    seed = int(os.environ.get("CAPD_MCP_CHAOS_SEED", random.randrange(1 << 32)))
    print(f"CAPD_MCP_CHAOS_SEED={seed}")
    rng = random.Random(seed)
    names = [f"busy{i}" for i in range(PODS)]
    both = {
        "tool_calls": [
            {"name": "mcp__everything__echo", "arguments": {"message": "busy"}},
            {"name": "bash", "arguments": {"command": "true"}},
        ]
    }
    steps = [both] * LOOP_STEPS + [{"text": "done"}]
    manifest = {
        "mcp_servers": {"everything": everything(mcp_commands)},
        "tools": ["bash"],
        "limits": {"max_steps": LOOP_STEPS + 2},
    }
    for name in names:
        await spawn(capd, name, scripted(*steps), **manifest)
    pods = {name: await connect_pod(capd, name, subscribe=False) for name in names}
    try:
        first = {name: await wait_mcp(pod, "everything", ready) for name, pod in pods.items()}
        for pod in pods.values():
            await pod.request({"method": "run", "text": "loop"})
        order = names * KILLS_PER_POD
        rng.shuffle(order)
        killed: list[int] = []
        busy: list[str] = []
        for name in order:
            state = await wait_mcp(
                pods[name], "everything", lambda s: ready(s) and s["pid"] not in (None, *killed)
            )
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            busy.append((await pods[name].request({"method": "status"}))["status"])
            os.kill(state["pid"], signal.SIGKILL)
            killed.append(state["pid"])
        for pod in pods.values():
            await _wait_idle(pod)
        ends = {name: await _last_turn_end(pod) for name, pod in pods.items()}
        last = {name: await wait_mcp(pod, "everything", ready, 60) for name, pod in pods.items()}
    finally:
        for pod in pods.values():
            await pod.close()
    assert busy == ["running"] * len(order), "each kill came while its pod's turn ran"
    assert all(end["result"] == "finished" for end in ends.values()), ends
    for name in names:
        assert last[name]["restarts"] == first[name]["restarts"] + KILLS_PER_POD, name
    assert not [pid for pid in killed if Path(f"/proc/{pid}").exists()]
