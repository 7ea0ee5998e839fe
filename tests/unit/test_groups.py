"""capd/proc/groups.py: a group whose members have all exited counts as gone at shutdown,
though `killpg(pgid, 0)` still finds its zombies; one walk of /proc a pass serves every
group."""

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from capd.proc.groups import live_groups, stop_all_groups, terminate_group


def _exited_leader() -> subprocess.Popen[bytes]:
    """A process group whose only member exited and is not reaped yet (a zombie)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    while True:
        with open(f"/proc/{child.pid}/stat", "rb") as file:
            if file.read().rpartition(b")")[2].split()[0] == b"Z":
                return child
        os.sched_yield()


def _sleeping_leader() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "30"], start_new_session=True)


async def test_a_group_of_zombies_is_gone_at_once() -> None:
    zombie = _exited_leader()
    sleeper = _sleeping_leader()
    try:
        os.killpg(zombie.pid, 0)  # the zombie still answers
        live = live_groups()
        assert zombie.pid not in live
        assert sleeper.pid in live
        terminate_group(zombie.pid, grace=60)
        async with asyncio.timeout(10):  # without the zombie check: 60 s, then SIGKILL
            await stop_all_groups()
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()


async def test_one_walk_of_proc_a_pass_serves_every_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shutdown with many groups left walks /proc once a pass (every 50 ms), not once a
    group a pass."""
    async with asyncio.timeout(10):
        await stop_all_groups()  # groups an earlier test of this worker left
    zombies = [_exited_leader() for _ in range(3)]
    walks = []
    scandir = os.scandir

    def counted(path: str) -> Iterator[os.DirEntry[str]]:
        walks.append(path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counted)
    try:
        for zombie in zombies:
            terminate_group(zombie.pid, grace=60)
        async with asyncio.timeout(10):
            await stop_all_groups()
        assert walks == ["/proc"]
    finally:
        for zombie in zombies:
            zombie.wait()
