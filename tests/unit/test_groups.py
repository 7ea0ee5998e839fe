"""capd/proc/groups.py: a group whose members have all exited counts as gone at shutdown,
though `killpg(pgid, 0)` still finds its zombies."""

import asyncio
import os
import subprocess
import sys

from capd.proc.groups import has_live_member, stop_all_groups, terminate_group


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
        assert not has_live_member(zombie.pid)
        assert has_live_member(sleeper.pid)
        terminate_group(zombie.pid, grace=60)
        async with asyncio.timeout(10):  # without the zombie check: 60 s, then SIGKILL
            await stop_all_groups()
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()
