"""`capd --limits`: the rlimit fallback forced on a real capd, and a forced backend that
cannot work here refused at start."""

import asyncio
import subprocess
import sys

from tests.conftest import CapdProcess
from tests.helpers import connect_pod, is_event, scripted, spawn, wait_for
from tests.test_limits_cgroups import backend_here


async def test_a_capd_forced_to_rlimits_sets_them_on_each_call(capd_dirs: CapdProcess) -> None:
    capd_dirs.extra_args = ["--limits", "rlimit"]
    await asyncio.to_thread(capd_dirs.start)
    call = {"name": "bash", "arguments": {"command": "ulimit -v; ulimit -u"}}
    await spawn(
        capd_dirs,
        "w1",
        scripted({"tool_calls": [call]}),
        tools=["bash"],
        limits={"memory_mb": 256, "pids": 64},
    )
    async with await connect_pod(capd_dirs, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        result, _ = await wait_for(pod, is_event("tool_result"))
        status = await pod.request({"method": "status"})
    assert result["output"] == "262144\n64"
    assert status["sandbox"]["limits"] == "rlimit"


async def test_a_forced_backend_that_cannot_work_here_stops_capd(capd_dirs: CapdProcess) -> None:
    missing = "cgroup2" if backend_here() != "cgroup2" else "cgroup1"
    argv = [sys.executable, "-m", "capd", "--limits", missing]
    dirs = ["--runtime-dir", str(capd_dirs.runtime_dir), "--state-dir", str(capd_dirs.state_dir)]
    done = await asyncio.to_thread(
        subprocess.run, [*argv, *dirs], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith(f"capd: {missing}: ")
