"""limits.memory_mb and limits.pids on a real capd, enforced with cgroups (§13).

These run where capd can make cgroups: this project's machines have the memory and pids
controllers on cgroup v1 and run the suite as root, so they exercise the cgroup1 backend.
cgroup v2 is untested on a real host here (tests/unit/test_cgroups_fake.py checks only its
paths and writes against a fake tree).
"""

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from capd.proc.limits import Limiter, group_name, pod_group
from protocol.client import Client
from tests.conftest import CapdProcess
from tests.engine_scaffold import STAND_IN_ACP_AGENT, spawn_on_engine
from tests.helpers import (
    alive,
    connect_pod,
    daemon_request,
    is_event,
    run_turn,
    scripted,
    sigkill,
    spawn,
    until,
    wait_for,
)
from tests.mcp_servers import McpServerCommands

UNBOXED = {"mode": "off"}
"""For tests that read the pids of what a call started ($! inside bwrap is in its own pid
namespace) and check that the cgroup alone catches what escapes: a sandbox's pid
namespace would kill it anyway. Limits apply without a sandbox too."""


def backend_here() -> str:
    """The backend a capd would pick here (detecting leaves no group behind)."""
    return Limiter.detect(Path("/nonexistent/capd-limits-probe")).kind


BACKEND = backend_here()
pytestmark = [
    pytest.mark.skipif(
        BACKEND not in ("cgroup1", "cgroup2"),
        reason=f"capd cannot make cgroups here (it would use {BACKEND}); run as root on a "
        "host with the memory and pids controllers",
    ),
    pytest.mark.shared_capd,
]


def pod_groups(capd: CapdProcess, pod: str) -> list[Path]:
    """The pod's group in each hierarchy capd uses."""
    name = group_name(capd.state_dir)
    found = []
    for hierarchy in ("memory", "pids"):
        root = Path("/sys/fs/cgroup") / hierarchy
        found += [path / pod_group(pod) for path in _under(root, name)]
    return found


def _under(root: Path, name: str) -> list[Path]:
    """The directories called `name` below `root`, two levels deep at most (capd's own
    group is the root or one below)."""
    return [path for pattern in (name, f"*/{name}", f"*/*/{name}") for path in root.glob(pattern)]


def bash(command: str, timeout_s: float | None = None) -> dict[str, Any]:
    arguments: dict[str, Any] = {"command": command}
    if timeout_s is not None:
        arguments["timeout_s"] = timeout_s
    return {"tool_calls": [{"name": "bash", "arguments": arguments}]}


def leaves(groups: list[Path]) -> list[Path]:
    return [sub for group in groups if group.is_dir() for sub in group.iterdir() if sub.is_dir()]


async def test_a_pids_limit_stops_a_fork_loop_and_capd_keeps_answering(
    capd: CapdProcess,
) -> None:
    loop = "for i in $(seq 200); do sleep 30 & done; wait"
    await spawn(
        capd,
        "w1",
        scripted(bash(loop, timeout_s=4), {"text": "done"}),
        tools=["bash"],
        limits={"pids": 32},
    )
    groups = pod_groups(capd, "w1")
    pids_group = next(group for group in groups if "/pids/" in str(group))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        await until(lambda: int((pids_group / "pids.current").read_text()) >= 32)
        status = await asyncio.wait_for(pod.request({"method": "status"}), timeout=2)
        assert status["status"] == "running"
        result, _ = await wait_for(pod, is_event("tool_result"))
        await wait_for(pod, is_event("turn_end"))
    assert "[limits.pids=32 reached: some processes could not start]" in result["output"]
    assert result["is_error"]
    # Its leaf is removed once no process is left in it (killed processes that init has
    # not reaped yet no longer count; pids.current still does, so it is not checked).
    assert leaves(groups) == []
    assert all((group / "cgroup.procs").read_text() == "" for group in groups)


async def test_a_call_over_the_memory_limit_is_killed_and_capd_lives(capd: CapdProcess) -> None:
    hog = f"{sys.executable} -c 'b = bytearray(512 << 20)'; echo after"
    await spawn(
        capd, "w1", scripted(bash(hog), {"text": "done"}), tools=["bash"], limits={"memory_mb": 64}
    )
    info = await daemon_request(capd, {"method": "info"})
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        result, _ = await wait_for(pod, is_event("tool_result"))
        await wait_for(pod, is_event("turn_end"))
        status = await pod.request({"method": "status"})
    assert result["is_error"]
    assert result["output"].endswith("after\n[killed: out of memory (limits.memory_mb=64)]")
    assert (await daemon_request(capd, {"method": "info"}))["pid"] == info["pid"]
    assert status["sandbox"]["limits"] == BACKEND


async def test_a_pod_named_like_a_control_file_gets_its_own_group(capd: CapdProcess) -> None:
    """`tasks`, `cgroup.procs`, `pids.max` are files of the group the pods' groups are made
    in (`memory.max` too, on v2): a pod's group is named `pod-<name>`."""
    names = ["tasks", "cgroup.procs", "pids.max", "memory.max"]
    for name in names:
        await spawn(
            capd,
            name,
            scripted(bash("cat /proc/self/cgroup"), {"text": "done"}),
            tools=["bash"],
            limits={"memory_mb": 256, "pids": 64},
            sandbox=UNBOXED,  # in bwrap's cgroup namespace /proc/self/cgroup says `/`
        )
    for name in names:
        async with await connect_pod(capd, name) as pod:
            await pod.request({"method": "run", "text": "go"})
            result, _ = await wait_for(pod, is_event("tool_result"))
            await wait_for(pod, is_event("turn_end"))
        assert not result["is_error"], result["output"]
        assert f"/{group_name(capd.state_dir)}/pod-{name}/bash-1\n" in result["output"]
        await daemon_request(capd, {"method": "delete", "name": name})
        assert not any(group.exists() for group in pod_groups(capd, name))


async def test_a_call_that_cannot_start_leaves_no_leaf(capd: CapdProcess, tmp_path: Path) -> None:
    cwd = tmp_path / "gone"
    cwd.mkdir()
    await spawn(
        capd,
        "w1",
        scripted(bash("echo ran"), {"text": "done"}),
        tools=["bash"],
        cwd=str(cwd),
        limits={"pids": 64},
        sandbox=UNBOXED,
    )
    groups = pod_groups(capd, "w1")
    cwd.rmdir()  # the exec fails: no directory to run in
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        result, _ = await wait_for(pod, is_event("tool_result"))
        await wait_for(pod, is_event("turn_end"))
    assert result["is_error"]
    assert "No such file or directory" in result["output"]
    assert all(group.is_dir() for group in groups)
    assert leaves(groups) == []


async def test_a_pod_without_limits_gets_no_group(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(bash("cat /proc/self/cgroup")), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        result, _ = await wait_for(pod, is_event("tool_result"))
        status = await pod.request({"method": "status"})
    assert group_name(capd.state_dir) not in result["output"]
    assert not any(group.parent.exists() for group in pod_groups(capd, "w1"))
    assert status["sandbox"]["limits"] == "none"


async def test_stopping_a_pod_kills_its_processes_and_removes_its_groups(
    capd: CapdProcess, tmp_path: Path
) -> None:
    pid_file = tmp_path / "tool.pid"
    command = f"setsid sleep 300 & echo $! > {pid_file}.new && mv {pid_file}.new {pid_file}; wait"
    await spawn(
        capd, "w1", scripted(bash(command)), tools=["bash"], limits={"pids": 64}, sandbox=UNBOXED
    )
    groups = pod_groups(capd, "w1")
    assert len(groups) == 2
    assert all(group.is_dir() for group in groups)
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        await until(pid_file.exists)
    escaped = int(pid_file.read_text())
    await daemon_request(capd, {"method": "stop", "name": "w1"})
    assert not alive(escaped)
    assert not any(group.parent.exists() for group in groups)  # capd's too: no pod has one


@pytest.mark.own_capd
async def test_the_next_capd_removes_the_groups_a_killed_capd_left(
    capd: CapdProcess, tmp_path: Path
) -> None:
    # Without capd's owner mark, in its own session: only the pod's group still holds it.
    pid_file = tmp_path / "tool.pid"
    escape = "env -u CAPD_OWNER setsid sleep 300"
    command = f"{escape} & echo $! > {pid_file}.new && mv {pid_file}.new {pid_file}; wait"
    await spawn(
        capd,
        "w1",
        scripted(bash(command)),
        tools=["bash"],
        limits={"memory_mb": 256},
        sandbox=UNBOXED,
    )
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        await until(pid_file.exists)
    groups = pod_groups(capd, "w1")
    old_leaves = leaves(groups)
    assert old_leaves
    sleeper = int(pid_file.read_text())
    await sigkill(capd)
    assert alive(sleeper)
    await asyncio.to_thread(capd.start)
    await until(lambda: not alive(sleeper))
    assert not any(leaf.exists() for leaf in old_leaves)
    assert all(group.is_dir() for group in groups)  # made again for the restored pod
    await daemon_request(capd, {"method": "delete", "name": "w1"})
    assert not any(group.exists() for group in groups)


async def test_a_new_limiter_on_the_same_state_dir_removes_every_group_left(
    tmp_path: Path,
) -> None:
    """What a killed capd left of pods that are not brought up again goes at start-up."""
    first = Limiter.detect(tmp_path / "state")
    leaf = first.pod("gone", 256, 64).leaf("bash")
    assert leaf is not None
    escaped = await asyncio.create_subprocess_exec(*leaf.wrap(["setsid", "sleep", "300"]))
    groups = leaf.groups
    await until(lambda: all((group.path / "cgroup.procs").read_text() for group in groups))
    second = Limiter.detect(tmp_path / "state")
    assert await asyncio.wait_for(escaped.wait(), 5) == -9
    assert not any(group.path.parent.exists() for group in groups)
    assert [h.base for h in second.hierarchies] == [h.base for h in first.hierarchies]
    assert not any(h.base.exists() for h in second.hierarchies)  # until a pod has limits


async def test_a_fork_refused_in_one_leaf_is_not_another_leafs(tmp_path: Path) -> None:
    """The kernel counts a refused fork in the leaf that forked (v1; v2 before
    pids.events.local): a call is not blamed for another process of its pod."""
    limiter = Limiter.detect(tmp_path / "state")
    pod = limiter.pod("w1", None, 16)
    quiet, forking = pod.leaf("bash"), pod.leaf("bash")
    assert quiet is not None
    assert forking is not None
    waiting = await asyncio.create_subprocess_exec(*quiet.wrap(["sleep", "300"]))
    loop = "import os, time\nfor _ in range(40):\n    os.fork() or time.sleep(300)"
    forks = await asyncio.create_subprocess_exec(
        *forking.wrap([sys.executable, "-c", loop]), stderr=asyncio.subprocess.DEVNULL
    )
    assert await forks.wait() == 1  # BlockingIOError at the first fork refused
    refused = forking.outcome()
    assert refused is not None
    assert refused.failed
    waiting.kill()
    await waiting.wait()
    await asyncio.gather(quiet.close(), forking.close())
    assert quiet.outcome() is None
    await pod.close()
    limiter.close()


async def mcp_server(pod: Client, name: str, ok: Callable[[dict[str, Any]], bool]) -> Any:
    """The server's `status.mcp` entry once `ok` holds for it."""
    found: dict[str, Any] = {}

    async def check() -> bool:
        status = await pod.request({"method": "status"})
        found.update(next(s for s in status["mcp"] if s["name"] == name))
        return ok(found)

    async with asyncio.timeout(30):
        while not await check():
            await asyncio.sleep(0.05)
    return found


async def test_an_mcp_server_runs_in_its_own_leaf_and_is_restarted_when_killed_for_memory(
    capd: CapdProcess, mcp_commands: McpServerCommands
) -> None:
    time_server = {"command": mcp_commands.time[0]}
    await spawn(
        capd, "w1", scripted(), mcp_servers={"time": time_server}, limits={"memory_mb": 256}
    )
    async with await connect_pod(capd, "w1") as pod:
        server = await mcp_server(pod, "time", lambda s: s["state"] == "ready")
    cgroups = Path(f"/proc/{server['pid']}/cgroup").read_text()
    assert f"/{group_name(capd.state_dir)}/pod-w1/mcp-time-1\n" in cgroups
    await daemon_request(capd, {"method": "delete", "name": "w1"})
    assert not alive(server["pid"])

    # 16 MiB is less than the server needs to start: the kernel kills it, capd restarts it.
    await spawn(capd, "w2", scripted(), mcp_servers={"time": time_server}, limits={"memory_mb": 16})
    async with await connect_pod(capd, "w2") as pod:
        server = await mcp_server(pod, "time", lambda s: s["restarts"] >= 1)
    # Killed by SIGKILL; inside a sandbox, bwrap passes that on as exit code 128 + 9.
    assert "SIGKILL" in server["error"] or "code 137" in server["error"]


async def test_an_engine_process_runs_in_its_own_leaf(capd: CapdProcess, tmp_path: Path) -> None:
    engine = STAND_IN_ACP_AGENT.engine(tmp_path)
    await spawn_on_engine(capd, "ag", engine, cwd=str(tmp_path), limits={"pids": 64})
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await run_turn(pod, "hello")
    assert end["result"] == "finished"
    groups = pod_groups(capd, "ag")
    (leaf,) = {path.name for path in leaves(groups)}
    assert leaf == "engine-1"
    pids = [
        int(pid) for group in groups for pid in (group / leaf / "cgroup.procs").read_text().split()
    ]
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids]
    assert any(b"acp_agent.py" in command for command in commands)
    await daemon_request(capd, {"method": "stop", "name": "ag"})
    assert not any(alive(pid) for pid in pids)
    assert not any(group.exists() for group in groups)
