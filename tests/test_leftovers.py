"""Tools a SIGKILLed capd left running are stopped by a later capd, however often it dies."""

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from capd.proc.groups import KILL_GRACE_S
from tests.conftest import CapdProcess
from tests.helpers import connect_pod, scripted, sigkill, spawn, until

MARKER = "40.123"
"""The sleep's argument: no other process on the machine runs `sleep 40.123`."""


def _sleepers() -> list[int]:
    """Live processes running `sleep MARKER` (a zombie's cmdline is empty)."""
    argv = f"sleep\0{MARKER}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().endswith(argv):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


async def test_a_tool_ignoring_sigterm_dies_though_capd_is_killed_again_within_the_grace(
    capd: CapdProcess,
) -> None:
    """The second capd sends the tool SIGTERM and dies before its SIGKILL is due; the third
    one still knows the first one's token, and that the grace is over: it sends SIGKILL
    before it even listens."""
    command = f"trap '' TERM; exec sleep {MARKER}"
    tool = {"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}
    # Unconfined: a sandboxed tool dies with capd by itself (tests/test_sandbox.py).
    await spawn(capd, "w1", scripted(tool), tools=["bash"], sandbox={"mode": "off"})
    try:
        async with await connect_pod(capd, "w1") as pod:
            await pod.request({"method": "run", "text": "go"})
            await until(lambda: bool(_sleepers()))
        await sigkill(capd)
        started = time.monotonic()
        await asyncio.to_thread(capd.start)  # sends the sleep SIGTERM, which it ignores
        terminated = time.monotonic()  # the SIGTERM went out before capd answered
        await sigkill(capd)
        if not _sleepers():
            # Only a capd that lived through the grace may have sent SIGKILL already.
            assert time.monotonic() - started > KILL_GRACE_S, "SIGKILL came before the grace"
            pytest.skip("capd lived through the grace (a loaded machine): its SIGKILL landed")
        await until(lambda: time.monotonic() - terminated > KILL_GRACE_S)
        await asyncio.to_thread(capd.start)
        await sigkill(capd)
        await until(lambda: not _sleepers(), timeout=1)
    finally:
        for pid in _sleepers():
            os.kill(pid, signal.SIGKILL)
