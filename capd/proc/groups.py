"""Stopping process groups: SIGTERM now, SIGKILL after KILL_GRACE_S for whatever is left.

Tool commands and engine processes each run in their own session, so their process group
holds everything they start. `terminate_group` returns at once (a pause must be prompt);
the SIGKILL follows on a timer, and `stop_all_groups` at daemon shutdown makes sure it
lands before capd exits.
"""

import asyncio
import functools
import os
import signal
from collections.abc import Container

KILL_GRACE_S = 2.0
"""How long a process group has to exit after SIGTERM before it gets SIGKILL."""


class _Terminations:
    """Process groups sent SIGTERM, each due a SIGKILL at its deadline unless it is gone."""

    def __init__(self) -> None:
        self._due: dict[int, float] = {}

    def terminate(self, pgid: int, grace: float) -> None:
        if grace <= 0:
            self._due.pop(pgid, None)
            signal_group(pgid, signal.SIGKILL)
            return
        if not signal_group(pgid, signal.SIGTERM) or pgid in self._due:
            return
        loop = asyncio.get_running_loop()
        self._due[pgid] = loop.time() + grace
        loop.call_later(grace, self._kill, pgid)

    def _kill(self, pgid: int) -> None:
        if self._due.pop(pgid, None) is not None:
            signal_group(pgid, signal.SIGKILL)

    async def finish(self) -> None:
        """Wait until every terminated group is gone, killing those past their deadline."""
        loop = asyncio.get_running_loop()
        while self._due:
            live = functools.cache(live_groups)  # one walk of /proc a pass, when first needed
            for pgid, due in list(self._due.items()):
                if not signal_group(pgid, 0) or pgid not in live():
                    del self._due[pgid]
                elif loop.time() >= due:
                    self._kill(pgid)
            if self._due:
                await asyncio.sleep(0.05)


_GROUPS = _Terminations()


def terminate_group(pgid: int, grace: float = KILL_GRACE_S) -> None:
    """SIGTERM the group now and SIGKILL it after `grace` unless it is gone; SIGKILL it
    now when no grace is left (a leftover group an earlier capd already sent SIGTERM)."""
    _GROUPS.terminate(pgid, grace)


async def stop_all_groups() -> None:
    """Daemon shutdown: let terminated process groups exit, SIGKILL the rest."""
    await _GROUPS.finish()


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_groups() -> Container[int]:
    """The process groups with a process that has not exited yet, from one walk of /proc.
    A group whose members are all zombies (exited, waiting for a parent, often init, to
    reap them) still answers `killpg(pgid, 0)` but holds nothing a SIGKILL could stop.
    Every group when /proc cannot tell."""
    try:
        entries = os.scandir("/proc")
    except OSError:
        return _EVERY_GROUP
    live = set()
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as file:
                    fields = file.read().rpartition(b")")[2].split()
            except OSError:
                continue
            if len(fields) > 2 and fields[0] not in (b"Z", b"X"):
                live.add(int(fields[2]))
    return live


class _EveryGroup:
    """What `live_groups` gives when /proc cannot be read: any group may be live."""

    def __contains__(self, pgid: object) -> bool:
        return True


_EVERY_GROUP = _EveryGroup()


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
